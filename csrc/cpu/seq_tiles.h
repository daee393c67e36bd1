// The (sequence, tile) work list of the CPU attention kernels: every sequence's tiles once,
// so the work of a packed batch is the sum of its documents' tiles (never N x the longest).
#pragma once
#include <cstdint>
#include <vector>

#include "../core/params.h"
#include "../core/window.h"

namespace rattention::cpu {

struct SeqTile {
  int64_t seq;   // sequence (batch element or document)
  int64_t tile;  // tile index inside it
};

// Tiles of `rows` rows over each sequence's query rows (over_keys = false) or k/v rows.
inline std::vector<SeqTile> list_seq_tiles(const QkvParams& p, int64_t rows, bool over_keys) {
  std::vector<SeqTile> tiles;
  for (int64_t b = 0; b < p.num_seqs(); ++b) {
    const int64_t n = ceil_div(over_keys ? p.seqlen_k(b) : p.seqlen_q(b), rows);
    for (int64_t t = 0; t < n; ++t) tiles.push_back(SeqTile{b, t});
  }
  return tiles;
}

}  // namespace rattention::cpu
