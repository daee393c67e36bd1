# The JAX binding: _jax_ffi, a shared library of XLA FFI handlers (csrc/jax) over the same
# CPU kernels as _C (rattention_cpu_kernels). Built only when the building interpreter can
# import jax (pip install .[jax]); otherwise skipped, so the torch-only build is unchanged.
# Python loads it with ctypes (rattention_ext/jax.py): it links neither torch nor Python.
#
#   RATTENTION_JAX  AUTO (default: build when jax is found), ON (require jax), OFF
set(RATTENTION_JAX "AUTO" CACHE STRING "Build the JAX FFI module: AUTO, ON or OFF")

if(NOT RATTENTION_JAX STREQUAL "OFF")
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c "import jax, jax.ffi; print(jax.ffi.include_dir()); print(jax.__version__)"
    OUTPUT_VARIABLE _ratt_jax_out OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _ratt_jax_rc ERROR_QUIET)
  if(_ratt_jax_rc EQUAL 0)
    string(REPLACE "\n" ";" _ratt_jax_out "${_ratt_jax_out}")
    list(GET _ratt_jax_out 0 RATTENTION_JAX_INCLUDE_DIR)
    list(GET _ratt_jax_out 1 RATTENTION_JAX_VERSION)
  elseif(RATTENTION_JAX STREQUAL "ON")
    message(FATAL_ERROR "rattention: RATTENTION_JAX=ON but ${Python_EXECUTABLE} cannot import jax.ffi")
  endif()
endif()

if(RATTENTION_JAX_INCLUDE_DIR)
  message(STATUS "rattention: JAX FFI module for jax ${RATTENTION_JAX_VERSION} (${RATTENTION_JAX_INCLUDE_DIR})")
  file(GLOB _ratt_jax_sources CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/jax/*.cpp)
  # The CUDA handlers (ffi_cuda.cpp) only in a CUDA build, below.
  list(FILTER _ratt_jax_sources EXCLUDE REGEX "/ffi_cuda[^/]*\\.cpp$")
  add_library(_jax_ffi MODULE ${_ratt_jax_sources})
  target_link_libraries(_jax_ffi PRIVATE rattention_cpu_kernels)
  target_include_directories(_jax_ffi SYSTEM PRIVATE ${RATTENTION_JAX_INCLUDE_DIR})
  target_include_directories(_jax_ffi PRIVATE ${PROJECT_SOURCE_DIR}/csrc)
  target_compile_options(_jax_ffi PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-O3 -Wall>)
  # Only the handler symbols (extern "C", marked RATT_FFI_EXPORT) are exported.
  set_target_properties(_jax_ffi PROPERTIES PREFIX "" SUFFIX ".so" CXX_VISIBILITY_PRESET hidden
                        VISIBILITY_INLINES_HIDDEN ON)
  # The kernels' thread pool in this module (csrc/jax/ffi_parallel.cpp) is OpenMP.
  find_package(OpenMP)
  if(OpenMP_CXX_FOUND)
    target_link_libraries(_jax_ffi PRIVATE OpenMP::OpenMP_CXX)
  else()
    message(WARNING "rattention: no OpenMP: the JAX FFI module runs the CPU kernels on one thread")
  endif()
  if(RATTENTION_WITH_CUDA)
    # CUDA handlers (csrc/jax/ffi_cuda.cpp) over the CUDA kernels (csrc/cuda/*.cu; compiled
    # for this module as well: _C's copies sit behind its torch op layer).
    file(GLOB _ratt_jax_cu CONFIGURE_DEPENDS ${PROJECT_SOURCE_DIR}/csrc/cuda/*.cu)
    target_sources(_jax_ffi PRIVATE ${PROJECT_SOURCE_DIR}/csrc/jax/ffi_cuda.cpp ${_ratt_jax_cu})
    target_include_directories(_jax_ffi PRIVATE ${CUTLASS_INCLUDE_DIRS})
    set_target_properties(_jax_ffi PROPERTIES CUDA_ARCHITECTURES "${RATTENTION_CUDA_ARCHS}"
                          CUDA_VISIBILITY_PRESET hidden)
    target_compile_options(_jax_ffi PRIVATE
      $<$<COMPILE_LANGUAGE:CUDA>:-O3 --expt-relaxed-constexpr --use_fast_math -lineinfo>)
    find_package(CUDAToolkit REQUIRED)
    target_link_libraries(_jax_ffi PRIVATE CUDA::cudart)
  endif()
  if(RATTENTION_OUTPUT_DIR)
    set_target_properties(_jax_ffi PROPERTIES LIBRARY_OUTPUT_DIRECTORY ${RATTENTION_OUTPUT_DIR})
  endif()
elseif(RATTENTION_JAX STREQUAL "OFF")
  message(STATUS "rattention: no JAX FFI module (RATTENTION_JAX=OFF)")
else()
  message(STATUS "rattention: jax not importable: no JAX FFI module (pip install .[jax] to add it)")
endif()
