// Allreduce over MPI: our pipelined ring, and the MPI library's own collectives as baselines.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "comm/reduce.h"
#include "common/dtype.h"

namespace hpclm {

// An allreduce op: an elementwise reduction, optionally followed by division by the rank count.
struct AllreduceOp {
  ReduceOp reduce;
  bool average;
};

inline AllreduceOp parse_allreduce_op(const std::string& s) {
  if (s == "avg" || s == "average") return {ReduceOp::sum, true};
  if (s == "sum" || s == "prod" || s == "product" || s == "min" || s == "max") return {parse_reduce_op(s), false};
  throw std::invalid_argument("unsupported allreduce op '" + s + "': use sum, avg, min, max or prod");
}

struct RingOptions {
  size_t segment_bytes = size_t(512) << 10;  // pipeline unit: one message, one reduction call
  int depth = 2;                             // segments in flight per direction (scratch slots)
  int threads = 1;                           // OpenMP threads for the reduction of a segment
  int lag = 2;                               // units between a segment's steps (wavefront order)
};

}  // namespace hpclm

#ifdef HPCLM_WITH_MPI
#include <mpi.h>

namespace hpclm {

// recv[i] = op over ranks of send[i], for `count` elements; send == recv means in place;
// otherwise the two must not overlap. Every rank of `comm` calls it with the same count, dtype
// and op (hpclm.probe.ring_allreduce checks that first). Reduce-scatter then allgather around
// the ring rank -> rank+1; each of the n chunks is cut into segments that are received while the
// previous one is reduced. Throws std::runtime_error on MPI errors.
void ring_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm,
                    const RingOptions& options = {});

// The same contract through the library's MPI_Allreduce (half types: a user-defined MPI_Op that
// computes in float32, since MPI has no 16-bit float types).
void library_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm);

// MPI_Sendrecv of `bytes` to rank+1 from rank-1: the traffic of one ring link.
void neighbor_sendrecv(const void* send, void* recv, size_t bytes, MPI_Comm comm);

// Grow-only, 64-byte aligned scratch of this thread, shared by the ring and recursive doubling (never nested).
char* thread_scratch(size_t bytes);

// Recursive doubling (power-of-two rank counts, messages under 2 GiB): log2(n) exchanges of the whole
// buffer, identical bits on every rank. The latency path for small tensor-parallel activations.
void doubling_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm);

// MPI_Allgather of `bytes` from every rank into recv (n * bytes, in rank order).
void allgather_bytes(const void* send, void* recv, size_t bytes, MPI_Comm comm);

class ShmAllreduce;

// One tensor-parallel group's allreduce, set up once (collectively) and called per activation:
// through the group's shared-memory segment (pieces of `slot_bytes`) for messages up to `shm_bytes`
// when every rank is on one node, else recursive doubling up to `small_bytes` on a power-of-two
// group, else the ring. Counts its calls and the seconds spent in them.
class TpComm {
 public:
  TpComm(MPI_Comm comm, size_t small_bytes, size_t shm_bytes, size_t slot_bytes);
  ~TpComm();
  void allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op);
  // "shared memory" or "MPI (<why not shared memory>)"
  std::string transport() const;
  double take_seconds();
  uint64_t calls() const { return calls_; }

 private:
  MPI_Comm comm_;
  int size_ = 1;
  size_t small_bytes_, shm_bytes_;
  std::unique_ptr<ShmAllreduce> shm_;
  std::string no_shm_;
  double seconds_ = 0;
  uint64_t calls_ = 0;
};

}  // namespace hpclm
#endif
