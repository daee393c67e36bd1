// tools/emu coverage recorder: which (kernel instantiation, path) pairs of csrc/cuda ran.
//
// The kernels mark their code paths with RATT_COVER("path") (csrc/cuda/launch.cuh; nothing
// under nvcc). In the emulated build every marker expands to a static site object of a
// class template keyed on a local tag type, so each (function instantiation, marker) is a
// distinct site, and the site registers itself when the module loads: the registry lists
// every instantiation the emulated build compiled (the same launchers and dispatch as the
// nvcc build), including those that never ran, which is what lets a test fail on a
// compiled instantiation or path that no test reached. A hit goes through emu::cover_hit
// (emu.h): kernel code's own loads and stores of module statics would count as static
// __shared__ accesses for the emulator's memory checks; taking the address of `registered`
// (not loading it) is what instantiates the registration.
//
// Read from Python through the module's coverage() (tools/emu/emu_ops.cpp): a list of
// (function signature, path, any_instantiation, hits); tools/emu/coverage.py turns the signatures into the
// kernel names tools/cuda_check.py reports.
#pragma once
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

namespace emu {

struct CoverSite {
  const char* function;  // __PRETTY_FUNCTION__ of the marker's tag: names the instantiation
  const char* path;
  bool any_instantiation;  // RATT_COVER_ANY: one instantiation of the function reaching it is enough
  int64_t hits;
};

inline std::vector<CoverSite*>& cover_registry() {
  static std::vector<CoverSite*> sites;
  return sites;
}

// One site per Tag (a local struct of one function instantiation's marker). `site` is
// zero-initialised before any dynamic initialisation, so the order in which `registered`
// and other sites initialise does not matter.
template <class Tag>
struct CoverSiteOf {
  static CoverSite site;
  static CoverSite* const registered;
  static CoverSite* enroll() {
    site.function = Tag::function();
    site.path = Tag::path();
    site.any_instantiation = Tag::any();
    cover_registry().push_back(&site);
    return &site;
  }
};
template <class Tag>
CoverSite CoverSiteOf<Tag>::site;
template <class Tag>
CoverSite* const CoverSiteOf<Tag>::registered = CoverSiteOf<Tag>::enroll();

inline std::vector<std::tuple<std::string, std::string, bool, int64_t>> cover_snapshot() {
  std::vector<std::tuple<std::string, std::string, bool, int64_t>> out;
  for (const CoverSite* s : cover_registry())
    out.emplace_back(s->function, s->path, s->any_instantiation, s->hits);
  return out;
}

inline void cover_reset() {
  for (CoverSite* s : cover_registry()) s->hits = 0;
}

}  // namespace emu

// The tag's function() names the enclosing function instantiation (GCC prints the local
// class as "<enclosing function>::<tag>::function() [with <template arguments>]").
#define RATT_EMU_COVER(path_literal, any_literal)                                   \
  do {                                                                              \
    struct RattCoverTag {                                                           \
      static const char* function() { return __PRETTY_FUNCTION__; }                \
      static const char* path() { return path_literal; }                            \
      static bool any() { return any_literal; }                                     \
    };                                                                              \
    (void)&::emu::CoverSiteOf<RattCoverTag>::registered;                            \
    ::emu::cover_hit(&::emu::CoverSiteOf<RattCoverTag>::site.hits);                  \
  } while (0)
