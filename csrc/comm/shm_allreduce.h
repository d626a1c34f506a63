// Allreduce through one shared-memory segment mapped by every rank of a group on one node: the
// latency path for tensor-parallel activations (no MPI message, no copy through a transport).
#pragma once
#ifdef HPCLM_WITH_MPI
#include <mpi.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <string>

#include "comm/allreduce.h"

namespace hpclm {

// The segment holds, per rank, one sequence flag and two slots of slot_bytes. allreduce() cuts a
// message into pieces of one slot; for each piece every rank copies its part into its slot,
// publishes the piece's sequence number, waits until every rank has published it, then reduces all
// slots in rank order into recv, so every rank computes the same bits. Two slots per rank make
// reuse safe: a rank writes the slot of piece s only after every peer published s-1, which each
// does only once it has finished reading piece s-2 (the same slot).
// One caller thread per rank; every rank calls with the same count, dtype and op.
class ShmAllreduce {
 public:
  // Collective over comm. nullptr when the ranks do not share one node or the segment cannot be
  // made; *why then says which, and every rank returns the same.
  static std::unique_ptr<ShmAllreduce> create(MPI_Comm comm, size_t slot_bytes, std::string* why);
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  void allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op);

 private:
  ShmAllreduce(char* base, size_t mapped, int ranks, int rank, size_t slot_bytes);
  std::atomic<uint64_t>& flag(int r) const;
  char* slot(int r, uint64_t seq) const;
  void wait_for(int r, uint64_t seq) const;

  char* base_;
  size_t mapped_;
  int ranks_, rank_;
  size_t slot_bytes_;
  uint64_t seq_ = 0;
};

}  // namespace hpclm
#endif
