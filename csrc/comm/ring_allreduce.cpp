// Pipelined ring allreduce over MPI point-to-point.
//
// Work is a sequence of units (step, k): steps 0..n-2 reduce-scatter, n-1..2n-3 allgather; k is a
// segment of the step's chunk. Every chunk is cut into the same number of segments (nseg), so a
// unit means the same message on every rank: what rank-1 sends as (s, k) is what this rank
// receives as (s, k), and send (s, k) forwards what receive (s-1, k) brought in. Units run in
// wavefront order, (s, k) `lag` places after (s-1, k), so a segment moves on while it is still in
// cache (lag >= nseg would be step by step). Each rank posts its sends and the next receives, then
// blocks only on its oldest receive, whose send the left neighbour has always posted by then
// (it comes earlier in the same order); this keeps the ring deadlock-free for any n.
#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

#include "comm/allreduce.h"
#include "comm/mpi_util.h"

namespace hpclm {

char* thread_scratch(size_t bytes) {
  struct Free {
    void operator()(char* p) const { std::free(p); }
  };
  thread_local std::unique_ptr<char, Free> buf;
  thread_local size_t size = 0;
  if (bytes > size) {
    size_t rounded = (bytes + 63) / 64 * 64;
    buf.reset(static_cast<char*>(std::aligned_alloc(64, rounded)));
    if (!buf) throw std::bad_alloc();
    size = rounded;
  }
  return buf.get();
}

namespace {

constexpr int kRingTag = 0x52494e47;  // "RING"; on hpclm's private communicator

struct Span {
  size_t offset, count;  // elements
};

class Ring {
 public:
  Ring(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm,
       const RingOptions& opt)
      : in_(static_cast<const char*>(send)), out_(static_cast<char*>(recv)), count_(count), dtype_(dtype),
        esize_(dtype_size(dtype)), op_(op), comm_(comm), opt_(opt) {
    MPI_Comm_size(comm, &n_);
    MPI_Comm_rank(comm, &rank_);
    size_t max_chunk = count / n_ + (count % n_ != 0);
    size_t seg_elems = std::max<size_t>(1, opt.segment_bytes / esize_);
    nseg_ = std::max<size_t>(1, (max_chunk + seg_elems - 1) / seg_elems);
    steps_ = 2 * (n_ - 1);
    depth_ = static_cast<size_t>(std::max(1, opt.depth));
    slot_bytes_ = (max_chunk + nseg_ - 1) / nseg_ * esize_;  // the longest segment
    tmp_ = thread_scratch(depth_ * slot_bytes_);
    order_units(static_cast<size_t>(std::max(1, opt.lag)));
    recv_req_.assign(order_.size(), MPI_REQUEST_NULL);
    send_req_.assign(order_.size(), MPI_REQUEST_NULL);
  }

  void run() {
    const size_t units = order_.size();
    size_t recvs_posted = 0, sends_posted = 0;
    for (size_t done = 0; done < units; ++done) {
      // sends first (they never block): each is ready once the receive it forwards is done
      while (sends_posted < units && sends_posted < done + depth_ && ready_to_send(sends_posted, done))
        post_send(sends_posted++);
      while (recvs_posted < units && recvs_posted < done + depth_) post_recv(recvs_posted++);
      finish_recv(done);
    }
    mpi::check(MPI_Waitall(static_cast<int>(units), send_req_.data(), MPI_STATUSES_IGNORE), "ring: MPI_Waitall");
  }

 private:
  struct Unit {
    int step;
    size_t k;
  };

  // Wavefront order: unit (s, k) gets key s * lag + k; by key, then newest step first.
  void order_units(size_t lag) {
    position_.assign(static_cast<size_t>(steps_) * nseg_, 0);
    size_t last_key = (steps_ - 1) * lag + nseg_ - 1;
    for (size_t key = 0; key <= last_key; ++key)
      for (int s = std::min<long long>(steps_ - 1, key / lag); s >= 0; --s) {
        size_t k = key - s * lag;
        if (k >= nseg_) break;  // older steps of this key are past the last segment too
        position_[s * nseg_ + k] = order_.size();
        order_.push_back({s, k});
      }
  }
  size_t position(int step, size_t k) const { return position_[step * nseg_ + k]; }
  bool ready_to_send(size_t u, size_t recvs_done) const {
    const Unit& x = order_[u];
    return x.step == 0 || position(x.step - 1, x.k) < recvs_done;
  }

  bool reduce_scatter(int step) const { return step < n_ - 1; }
  int mod(long long x) const { return static_cast<int>(((x % n_) + n_) % n_); }

  Span chunk(int j) const {
    size_t base = count_ / n_, rem = count_ % n_;
    return {j * base + std::min<size_t>(j, rem), base + (static_cast<size_t>(j) < rem)};
  }
  Span segment(int chunk_index, size_t k) const {
    Span c = chunk(chunk_index);
    size_t begin = c.count * k / nseg_, end = c.count * (k + 1) / nseg_;
    return {c.offset + begin, end - begin};
  }
  // The chunk this rank sends / receives at a step.
  int send_chunk(int step) const {
    return reduce_scatter(step) ? mod(rank_ - step) : mod(rank_ + 1 - (step - (n_ - 1)));
  }
  int recv_chunk(int step) const {
    return reduce_scatter(step) ? mod(rank_ - step - 1) : mod(rank_ - (step - (n_ - 1)));
  }

  void post_send(size_t u) {
    const Unit& x = order_[u];
    Span s = segment(send_chunk(x.step), x.k);
    if (s.count == 0) return;
    // Step 0 sends this rank's own data; later steps forward what the previous step produced.
    const char* src = (x.step == 0 ? in_ : out_) + s.offset * esize_;
    int right = mod(rank_ + 1);
    mpi::check(MPI_Isend(src, static_cast<int>(s.count * esize_), MPI_BYTE, right, kRingTag, comm_, &send_req_[u]),
               "ring: MPI_Isend");
  }

  void post_recv(size_t u) {
    const Unit& x = order_[u];
    Span s = segment(recv_chunk(x.step), x.k);
    if (s.count == 0) return;
    char* dst;
    if (reduce_scatter(x.step)) {
      dst = slot(u);
    } else {
      // Allgather writes the final chunk in place: the reduce-scatter send of this same segment
      // (step - (n-1), k), earlier in the order, must have left the buffer first.
      mpi::check(MPI_Wait(&send_req_[position(x.step - (n_ - 1), x.k)], MPI_STATUS_IGNORE), "ring: MPI_Wait");
      dst = out_ + s.offset * esize_;
    }
    int left = mod(rank_ - 1);
    mpi::check(MPI_Irecv(dst, static_cast<int>(s.count * esize_), MPI_BYTE, left, kRingTag, comm_, &recv_req_[u]),
               "ring: MPI_Irecv");
  }

  void finish_recv(size_t u) {
    const Unit& x = order_[u];
    Span s = segment(recv_chunk(x.step), x.k);
    if (s.count == 0) return;
    mpi::check(MPI_Wait(&recv_req_[u], MPI_STATUS_IGNORE), "ring: MPI_Wait");
    if (!reduce_scatter(x.step)) return;
    // out = this rank's input (op) the partial result of the ranks before it
    char* dst = out_ + s.offset * esize_;
    reduce_to(dst, in_ + s.offset * esize_, slot(u), s.count, dtype_, op_.reduce, opt_.threads);
    if (op_.average && x.step == n_ - 2) divide_by(dst, s.count, dtype_, static_cast<double>(n_), opt_.threads);
  }

  // Reduce-scatter receives land in one of `depth` scratch slots, reused round-robin.
  char* slot(size_t u) const { return tmp_ + (u % depth_) * slot_bytes_; }

  const char* in_;
  char* out_;
  size_t count_;
  DType dtype_;
  size_t esize_;
  AllreduceOp op_;
  MPI_Comm comm_;
  RingOptions opt_;
  int n_ = 1, rank_ = 0, steps_ = 0;
  size_t nseg_ = 1, depth_ = 2, slot_bytes_ = 0;
  char* tmp_ = nullptr;
  std::vector<Unit> order_;
  std::vector<size_t> position_;  // (step, k) -> place in order_
  std::vector<MPI_Request> recv_req_, send_req_;
};

}  // namespace

void ring_allreduce(const void* send, void* recv, size_t count, DType dtype, AllreduceOp op, MPI_Comm comm,
                    const RingOptions& options) {
  mpi::require_initialized("ring_allreduce");
  if (options.segment_bytes == 0 || options.segment_bytes > (size_t(1) << 30))
    throw std::invalid_argument("ring_allreduce: segment_bytes must be in 1..1 GiB");
  MPI_Comm ring = mpi::private_comm(comm);
  int n = 1;
  MPI_Comm_size(ring, &n);
  if (count == 0) return;
  if (n == 1) {  // op over one rank (avg included) is the identity
    if (send != recv) std::memcpy(recv, send, count * dtype_size(dtype));
    return;
  }
  Ring(send, recv, count, dtype, op, ring, options).run();
}

}  // namespace hpclm
