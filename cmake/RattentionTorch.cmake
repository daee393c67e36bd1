# Find the Python interpreter that builds us, then Torch and pybind11 through it
# (torch.utils.cmake_prefix_path, pybind11.get_cmake_dir()).
find_package(Python REQUIRED COMPONENTS Interpreter Development.Module)

execute_process(
  COMMAND ${Python_EXECUTABLE} -c
    "import torch, pybind11; print(torch.utils.cmake_prefix_path); print(pybind11.get_cmake_dir()); print(torch.__version__); print(int(torch.version.cuda is not None)); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _ratt_py_out
  OUTPUT_STRIP_TRAILING_WHITESPACE
  RESULT_VARIABLE _ratt_py_rc)
if(NOT _ratt_py_rc EQUAL 0)
  message(FATAL_ERROR "rattention: ${Python_EXECUTABLE} cannot import torch and pybind11")
endif()
string(REPLACE "\n" ";" _ratt_py_out "${_ratt_py_out}")
list(GET _ratt_py_out 0 _ratt_torch_prefix)
list(GET _ratt_py_out 1 _ratt_pybind11_dir)
list(GET _ratt_py_out 2 RATTENTION_TORCH_VERSION)
list(GET _ratt_py_out 3 RATTENTION_TORCH_HAS_CUDA)
list(LENGTH _ratt_py_out _ratt_len)
set(RATTENTION_TORCH_CUDA_VERSION "")
if(_ratt_len GREATER 4)
  list(GET _ratt_py_out 4 RATTENTION_TORCH_CUDA_VERSION)
endif()

list(APPEND CMAKE_PREFIX_PATH ${_ratt_torch_prefix})
set(pybind11_DIR ${_ratt_pybind11_dir})
find_package(pybind11 CONFIG REQUIRED)

# A CUDA build of torch looks for the CUDA toolkit in its config; a CPU-only build of ours
# must not need one, so hide CUDA from TorchConfig in that case.
if(RATTENTION_CPU_ONLY OR NOT RATTENTION_TORCH_HAS_CUDA)
  set(USE_CUDA OFF)
else()
  # TorchConfig links CUDA::nvrtc (CUDA_nvrtc_LIBRARY). A toolkit with only the compiler
  # (nvcc-only installs) has no libnvrtc; the nvidia-cuda-nvrtc wheel that CUDA torch
  # depends on has it (site-packages/nvidia/cu13/lib or nvidia/cuda_nvrtc/lib).
  execute_process(
    COMMAND ${Python_EXECUTABLE} -c
      "import nvidia; print(';'.join(p + s for p in nvidia.__path__ for s in ('/cu13/lib', '/cuda_nvrtc/lib')))"
    OUTPUT_VARIABLE _ratt_nvidia_libdirs OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  find_library(CUDA_nvrtc_LIBRARY NAMES nvrtc libnvrtc.so.13 libnvrtc.so.12
               HINTS "$ENV{CUDA_HOME}/lib64" "$ENV{CUDA_PATH}/lib64" /usr/local/cuda/lib64
               PATHS ${_ratt_nvidia_libdirs})
endif()
find_package(Torch REQUIRED)
# TorchConfig appends -gencode flags for torch's own architecture list (TORCH_CUDA_ARCH_LIST,
# else every arch torch supports, e.g. sm_50 that CUDA 13 rejects) to CMAKE_CUDA_FLAGS. Our
# architectures are RATTENTION_CUDA_ARCHS alone (the target's CUDA_ARCHITECTURES).
string(REGEX REPLACE "-gencode[ =]+arch=[^ ]+" "" CMAKE_CUDA_FLAGS "${CMAKE_CUDA_FLAGS}")

find_library(RATTENTION_TORCH_PYTHON_LIBRARY torch_python PATHS "${TORCH_INSTALL_PREFIX}/lib"
             NO_DEFAULT_PATH REQUIRED)
message(STATUS "rattention: torch ${RATTENTION_TORCH_VERSION} (cuda=${RATTENTION_TORCH_HAS_CUDA})")
