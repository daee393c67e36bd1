# CUTLASS / CuTe headers: CUTLASS_DIR (a checkout or install holding include/cutlass),
# else third_party/cutlass in this checkout, else the `nvidia-cutlass` pip package.
# Sets CUTLASS_INCLUDE_DIRS and CUTLASS_VERSION.
set(CUTLASS_DIR "$ENV{CUTLASS_DIR}" CACHE PATH "CUTLASS root (holding include/cutlass)")
set(_ratt_cutlass_candidates)
if(CUTLASS_DIR)
  list(APPEND _ratt_cutlass_candidates ${CUTLASS_DIR}/include)
endif()
list(APPEND _ratt_cutlass_candidates ${PROJECT_SOURCE_DIR}/third_party/cutlass/include)
execute_process(
  COMMAND ${Python_EXECUTABLE} -c
    "import cutlass_library, os; print(os.path.join(os.path.dirname(cutlass_library.__file__), 'source', 'include'))"
  OUTPUT_VARIABLE _ratt_pip_cutlass OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
if(_ratt_pip_cutlass)
  list(APPEND _ratt_cutlass_candidates ${_ratt_pip_cutlass})
endif()

set(CUTLASS_INCLUDE_DIRS "")
foreach(dir ${_ratt_cutlass_candidates})
  if(EXISTS ${dir}/cutlass/version.h AND EXISTS ${dir}/cute/tensor.hpp)
    set(CUTLASS_INCLUDE_DIRS ${dir})
    break()
  endif()
endforeach()
if(NOT CUTLASS_INCLUDE_DIRS)
  message(FATAL_ERROR "rattention: CUTLASS/CuTe headers not found; pip install nvidia-cutlass "
                      "or set CUTLASS_DIR (looked in: ${_ratt_cutlass_candidates})")
endif()
file(STRINGS ${CUTLASS_INCLUDE_DIRS}/cutlass/version.h _v REGEX "#define CUTLASS_(MAJOR|MINOR|PATCH) ")
string(REGEX REPLACE ".*CUTLASS_MAJOR ([0-9]+).*CUTLASS_MINOR ([0-9]+).*CUTLASS_PATCH ([0-9]+).*"
       "\\1.\\2.\\3" CUTLASS_VERSION "${_v}")
message(STATUS "rattention: CUTLASS ${CUTLASS_VERSION} at ${CUTLASS_INCLUDE_DIRS}")
