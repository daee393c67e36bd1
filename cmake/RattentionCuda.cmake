# Decide whether the CUDA kernels are built, and if so enable CUDA and find CUTLASS/CuTe.
# RATTENTION_WITH_CUDA is ON only when: not RATTENTION_CPU_ONLY, torch has CUDA, and a
# CUDA compiler is found.
include(CheckLanguage)
set(RATTENTION_WITH_CUDA OFF)
if(NOT RATTENTION_CPU_ONLY AND RATTENTION_TORCH_HAS_CUDA)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(RATTENTION_WITH_CUDA ON)
  else()
    message(WARNING "rattention: torch has CUDA but no CUDA compiler was found; building CPU only")
  endif()
endif()

if(RATTENTION_WITH_CUDA)
  set(CMAKE_CUDA_ARCHITECTURES ${RATTENTION_CUDA_ARCHS})
  enable_language(CUDA)
  set(CMAKE_CUDA_STANDARD 17)
  include(RattentionCutlass)
endif()

function(rattention_add_cuda_sources target)
  file(GLOB _cu CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu)
  file(GLOB _cuda_cpp CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*.cpp)
  target_sources(${target} PRIVATE ${_cu} ${_cuda_cpp})
  target_include_directories(${target} PRIVATE ${CUTLASS_INCLUDE_DIRS})
  # ATen/cuda/CUDAContext.h includes cusparse.h and cublas_v2.h. A compiler-only toolkit lacks
  # them; the nvidia-* wheels that CUDA torch depends on have them (after the toolkit's dirs).
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c
      "import glob, nvidia; print(';'.join(d for p in nvidia.__path__ for d in sorted(glob.glob(p + '/*/include'))))"
    OUTPUT_VARIABLE _ratt_nvidia_incdirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  foreach(_hdr cusparse.h cublas_v2.h)
    string(MAKE_C_IDENTIFIER "RATTENTION_DIR_${_hdr}" _var)
    find_path(${_var} ${_hdr} HINTS ${CMAKE_CUDA_TOOLKIT_INCLUDE_DIRECTORIES} PATHS ${_ratt_nvidia_incdirs})
    if(${_var})
      target_include_directories(${target} SYSTEM AFTER PRIVATE ${${_var}})
    endif()
  endforeach()
  set_target_properties(${target} PROPERTIES CUDA_ARCHITECTURES "${RATTENTION_CUDA_ARCHS}")
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr --use_fast_math -lineinfo>)
  string(REPLACE ";" "," _archs "${RATTENTION_CUDA_ARCHS}")
  target_compile_definitions(${target} PRIVATE
    RATTENTION_WITH_CUDA=1
    RATTENTION_CUDA_ARCHS="${_archs}"
    RATTENTION_CUDA_VERSION="${CMAKE_CUDA_COMPILER_VERSION}"
    RATTENTION_CUTLASS_VERSION="${CUTLASS_VERSION}")
endfunction()
