# Use ccache for C++ and CUDA compiles when it is installed (optional).
find_program(RATTENTION_CCACHE ccache)
if(RATTENTION_CCACHE)
  message(STATUS "rattention: using ccache ${RATTENTION_CCACHE}")
  set(CMAKE_CXX_COMPILER_LAUNCHER ${RATTENTION_CCACHE})
  set(CMAKE_CUDA_COMPILER_LAUNCHER ${RATTENTION_CCACHE})
endif()
