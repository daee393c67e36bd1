// Every op error names the package: the backends register their kernels through
// RATT_GUARDED(fn), which rethrows any error with a "rattention_ext: " prefix, keeping its
// Python type (ValueError, TypeError, IndexError, NotImplementedError, RuntimeError).
#pragma once
#include <c10/util/Exception.h>

#include <exception>
#include <stdexcept>
#include <string>
#include <utility>

namespace rattention {

inline std::string with_package_prefix(const std::string& msg) {
  static const std::string kPrefix = "rattention_ext: ";
  return msg.rfind("rattention_ext", 0) == 0 ? msg : kPrefix + msg;
}

template <typename Fn>
decltype(auto) with_package_errors(Fn&& fn) {
  try {
    return fn();
  } catch (const c10::ValueError& e) {
    C10_THROW_ERROR(ValueError, with_package_prefix(e.msg()));
  } catch (const c10::TypeError& e) {
    C10_THROW_ERROR(TypeError, with_package_prefix(e.msg()));
  } catch (const c10::IndexError& e) {
    C10_THROW_ERROR(IndexError, with_package_prefix(e.msg()));
  } catch (const c10::NotImplementedError& e) {
    C10_THROW_ERROR(NotImplementedError, with_package_prefix(e.msg()));
  } catch (const c10::OutOfMemoryError&) {
    throw;
  } catch (const c10::Error& e) {
    C10_THROW_ERROR(Error, with_package_prefix(e.msg()));
  } catch (const std::invalid_argument& e) {
    C10_THROW_ERROR(ValueError, with_package_prefix(e.what()));
  } catch (const std::bad_alloc&) {
    throw;
  } catch (const std::exception& e) {
    C10_THROW_ERROR(Error, with_package_prefix(e.what()));
  }
}

template <auto Fn, typename Sig = decltype(Fn)>
struct Guarded;

template <auto Fn, typename R, typename... Args>
struct Guarded<Fn, R (*)(Args...)> {
  static R call(Args... args) {
    return with_package_errors([&]() -> R { return Fn(std::forward<Args>(args)...); });
  }
};

}  // namespace rattention

// The kernel to register for op implementation `fn` (a free function).
#define RATT_GUARDED(fn) (&::rattention::Guarded<&fn>::call)
