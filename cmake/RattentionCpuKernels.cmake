# rattention_cpu_kernels: the CPU kernels of csrc/cpu as a torch-free OBJECT library, linked
# into every module that runs them (_C for torch, _jax_ffi for JAX). It excludes
# csrc/cpu/parallel.cpp: each module brings its own cpu/parallel.h implementation (torch's
# thread pool in _C, OpenMP in the JAX module).
#
# An OBJECT library (not STATIC) on purpose: its objects are linked whole and in the glob's
# order, exactly as when they were sources of _C. With an archive the linker would pull
# members in symbol-table order, which could let a wider-ISA copy of a shared inline
# function win (see below).
file(GLOB RATTENTION_CPU_KERNEL_SOURCES CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cpu/*.cpp)
list(REMOVE_ITEM RATTENTION_CPU_KERNEL_SOURCES ${PROJECT_SOURCE_DIR}/csrc/cpu/parallel.cpp)

add_library(rattention_cpu_kernels OBJECT ${RATTENTION_CPU_KERNEL_SOURCES})
target_include_directories(rattention_cpu_kernels PUBLIC ${PROJECT_SOURCE_DIR}/csrc)
target_compile_options(rattention_cpu_kernels PRIVATE -O3 -Wall -Wno-unknown-pragmas)
# The same flags the sources had inside the pybind11 module _C: hidden visibility and
# pybind11's link-time optimisation (-flto, PUBLIC: the modules linking the objects link
# with it too).
set_target_properties(rattention_cpu_kernels PROPERTIES CXX_VISIBILITY_PRESET hidden
                      POSITION_INDEPENDENT_CODE ON)
if(NOT DEFINED CMAKE_INTERPROCEDURAL_OPTIMIZATION AND TARGET pybind11::lto)
  target_link_libraries(rattention_cpu_kernels PUBLIC pybind11::lto)
endif()

# CPU micro-kernels: files named *_avx2.cpp / *_avx512.cpp get those ISA flags; the code
# picks one at run time (__builtin_cpu_supports), so one wheel runs on any x86-64. Their own
# code sits in per-ISA namespaces; for std:: inline functions instantiated in several files
# the linker keeps the first copy, and the glob's order puts the baseline files (and
# _avx2 before _avx512) first, so no narrower path ever runs a wider-ISA copy.
foreach(src ${RATTENTION_CPU_KERNEL_SOURCES})
  if(src MATCHES "_avx2\\.cpp$")
    set_source_files_properties(${src} PROPERTIES COMPILE_OPTIONS "-mavx2;-mfma;-mf16c")
  elseif(src MATCHES "_avx512\\.cpp$")
    set_source_files_properties(${src} PROPERTIES
      COMPILE_OPTIONS "-mavx512f;-mavx512bw;-mavx512vl;-mavx512dq;-mavx2;-mfma;-mf16c")
  endif()
endforeach()
