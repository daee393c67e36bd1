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
  # ATen/cuda headers include cusparse.h/cublas.h, which a minimal toolkit may lack; torch's
  # nvidia-* pip packages carry them (searched after the toolkit's own headers).
  file(GLOB _ratt_nv_inc "${TORCH_INSTALL_PREFIX}/../nvidia/cu13/include"
       "${TORCH_INSTALL_PREFIX}/../nvidia/cusparse/include" "${TORCH_INSTALL_PREFIX}/../nvidia/cublas/include")
  if(_ratt_nv_inc)
    target_include_directories(${target} AFTER PRIVATE ${_ratt_nv_inc})
  endif()
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
