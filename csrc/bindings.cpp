// The only pybind11 file: thin wrappers that turn Python values into the raw pointers,
// sizes and dtypes the C++ kernels take. No torch headers: Python passes data_ptr().
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <sstream>

#include "build_config.h"
#include "comm/allreduce.h"
#include "comm/reduce.h"
#include "common/cpu_features.h"
#include "common/dtype.h"
#include "attention/decode_attention.h"
#include "gemm/gemm.h"
#include "quant/quant_matmul.h"
#include "softmax/softmax.h"

#ifdef HPCLM_WITH_MPI
#include <mpi.h>

#include "comm/mpi_util.h"
#endif
#ifdef HPCLM_WITH_CUDA
#include "cuda/device.h"
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;
using namespace hpclm;

namespace {

py::list split_list(const std::string& csv) {
  py::list out;
  std::stringstream ss(csv);
  std::string item;
  while (std::getline(ss, item, ','))
    if (!item.empty()) out.append(item);
  return out;
}

std::string mpi_library_version() {
#ifdef HPCLM_WITH_MPI
  char buf[MPI_MAX_LIBRARY_VERSION_STRING];
  int len = 0;
  MPI_Get_library_version(buf, &len);  // allowed before MPI_Init
  std::string s(buf, len);
  while (!s.empty() && (s.back() == '\n' || s.back() == '\0' || s.back() == ' ')) s.pop_back();
  return s;
#else
  return "";
#endif
}

py::dict build_info() {
  py::dict d;
  d["compiler"] = HPCLM_CXX_COMPILER;
  d["cxx_flags"] = HPCLM_CXX_FLAGS;
  d["build_type"] = HPCLM_BUILD_TYPE;
  d["cpu_paths_compiled"] = split_list(HPCLM_ISA_LIST);
  py::list supported;
  for (Isa isa : compiled_isas())
    if (cpu_supports(isa)) supported.append(isa_name(isa));
  d["cpu_paths_supported"] = supported;
  d["cpu_path"] = isa_name(selected_isa());
  d["cpu_path_reason"] = isa_selection_reason();
#ifdef _OPENMP
  d["openmp"] = true;
  d["openmp_version"] = _OPENMP;
  d["openmp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
  d["openmp_version"] = py::none();
  d["openmp_max_threads"] = 1;
#endif
#ifdef HPCLM_WITH_MPI
  d["with_mpi"] = true;
  d["mpi_standard"] = HPCLM_MPI_C_VERSION;
#else
  d["with_mpi"] = false;
  d["mpi_standard"] = py::none();
#endif
  d["mpi_library_version"] = mpi_library_version();
  d["cuda_requested"] = HPCLM_CUDA_REQUESTED;
#ifdef HPCLM_WITH_CUDA
  d["with_cuda"] = true;
  d["cuda_archs"] = split_list(HPCLM_CUDA_ARCH_LIST);
  d["cuda_compiler_version"] = HPCLM_CUDA_COMPILER_VERSION;
  d["cuda_runtime_version"] = cuda_runtime_version();
#else
  d["with_cuda"] = false;
  d["cuda_archs"] = py::list();
  d["cuda_compiler_version"] = py::none();
  d["cuda_runtime_version"] = py::none();
#endif
  return d;
}

py::dict cuda_device_report() {
  py::dict d;
  py::list devices;
#ifdef HPCLM_WITH_CUDA
  std::string error;
  for (const CudaDevice& dev : cuda_devices(&error)) {
    py::dict e;
    e["index"] = dev.index;
    e["name"] = dev.name;
    e["capability"] = std::to_string(dev.major) + "." + std::to_string(dev.minor);
    e["total_memory"] = dev.total_memory;
    e["multiprocessors"] = dev.multiprocessors;
    devices.append(e);
  }
  d["error"] = error.empty() ? py::object(py::none()) : py::object(py::str(error));
#else
  d["error"] = "built without CUDA";
#endif
  d["devices"] = devices;
  return d;
}

}  // namespace

// --- softmax: Python passes data_ptr()s, the [batch0, batch1, sq, sk] view and the mask strides.
namespace {

SoftmaxShape softmax_shape(const std::vector<int64_t>& shape) {
  if (shape.size() != 4)
    throw std::invalid_argument("softmax: shape must be [batch0, batch1, sq, sk] (4 sizes), got " +
                                std::to_string(shape.size()));
  SoftmaxShape s{shape[0], shape[1], shape[2], shape[3]};
  check_softmax_shape(s);
  return s;
}

SoftmaxForward softmax_forward_args(uintptr_t x, uintptr_t y, const std::string& dtype,
                                    const std::vector<int64_t>& shape, double scale, uintptr_t mask,
                                    const std::vector<int64_t>& mask_strides, bool causal) {
  SoftmaxForward a;
  a.x = reinterpret_cast<const void*>(x);
  a.y = reinterpret_cast<void*>(y);
  a.dtype = parse_dtype(dtype);
  a.shape = softmax_shape(shape);
  a.scale = scale;
  a.causal = causal;
  if (mask != 0) {
    if (mask_strides.size() != 3)
      throw std::invalid_argument("softmax: mask_strides must be 3 element strides (batch0, batch1, sq)");
    a.mask.data = reinterpret_cast<const uint8_t*>(mask);
    a.mask.stride0 = mask_strides[0];
    a.mask.stride1 = mask_strides[1];
    a.mask.stride_q = mask_strides[2];
  }
  return a;
}

SoftmaxBackward softmax_backward_args(uintptr_t y, uintptr_t dy, uintptr_t dx, const std::string& dtype,
                                      const std::vector<int64_t>& shape, double scale, bool causal) {
  SoftmaxBackward a;
  a.y = reinterpret_cast<const void*>(y);
  a.dy = reinterpret_cast<const void*>(dy);
  a.dx = reinterpret_cast<void*>(dx);
  a.dtype = parse_dtype(dtype);
  a.shape = softmax_shape(shape);
  a.scale = scale;
  a.causal = causal;
  return a;
}

}  // namespace

// --- ring allreduce and MPI baselines (hpclm.probe) -----------------------------
namespace {

#ifdef HPCLM_WITH_MPI
// TpComm.allreduce takes small integer codes (a string argument costs more than the exchange at decode size)
constexpr int kTpOps = 3;
constexpr const char* kTpOpNames[kTpOps] = {"sum", "max", "avg"};
const AllreduceOp kTpOpTable[kTpOps] = {{ReduceOp::sum, false}, {ReduceOp::max, false}, {ReduceOp::sum, true}};

void bind_comm(py::module_& m) {
  RingOptions defaults;
  m.def(
      "ring_allreduce",
      [](uintptr_t send, uintptr_t recv, size_t count, const std::string& dtype, const std::string& op,
         long long comm, size_t segment_bytes, int depth, int threads, int lag) {
        DType t = parse_dtype(dtype);
        AllreduceOp o = parse_allreduce_op(op);
        RingOptions opt{segment_bytes, depth, threads, lag};
        py::gil_scoped_release release;
        ring_allreduce(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), count, t, o,
                       mpi::from_fortran(comm, "ring_allreduce"), opt);
      },
      py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("comm"),
      py::arg("segment_bytes") = defaults.segment_bytes, py::arg("depth") = defaults.depth,
      py::arg("threads") = defaults.threads, py::arg("lag") = defaults.lag,
      "Pipelined ring allreduce of `count` elements at raw addresses (send == recv: in place) over the "
      "communicator with Fortran handle `comm`. Unchecked: use hpclm.probe.ring_allreduce.");
  m.def(
      "mpi_allreduce",
      [](uintptr_t send, uintptr_t recv, size_t count, const std::string& dtype, const std::string& op, long long comm) {
        DType t = parse_dtype(dtype);
        AllreduceOp o = parse_allreduce_op(op);
        py::gil_scoped_release release;
        library_allreduce(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), count, t, o,
                          mpi::from_fortran(comm, "mpi_allreduce"));
      },
      py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("comm"),
      "The MPI library's MPI_Allreduce with ring_allreduce's contract (avg = sum / ranks; half types via a "
      "user-defined op in float32).");
  m.def(
      "mpi_sendrecv",
      [](uintptr_t send, uintptr_t recv, size_t bytes, long long comm) {
        py::gil_scoped_release release;
        neighbor_sendrecv(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), bytes,
                          mpi::from_fortran(comm, "mpi_sendrecv"));
      },
      py::arg("send"), py::arg("recv"), py::arg("bytes"), py::arg("comm"),
      "MPI_Sendrecv of `bytes` to rank+1 from rank-1 (one ring link's traffic).");
  py::class_<TpComm>(m, "TpComm",
                     "One tensor-parallel group's allreduce (collective constructor over the communicator with "
                     "Fortran handle `comm`): shared memory up to shm_bytes, in pieces of slot_bytes, when all ranks "
                     "share a node (shm_bytes = 0: never), else recursive doubling up to small_bytes, else the ring.")
      .def(py::init([](long long comm, size_t small_bytes, size_t shm_bytes, size_t slot_bytes) {
             return std::make_unique<TpComm>(mpi::from_fortran(comm, "TpComm"), small_bytes, shm_bytes, slot_bytes);
           }),
           py::arg("comm"), py::arg("small_bytes"), py::arg("shm_bytes"), py::arg("slot_bytes"))
      .def(
          "allreduce",
          [](TpComm& c, uintptr_t send, uintptr_t recv, size_t count, int dtype, int op) {
            if (dtype < 0 || dtype > static_cast<int>(DType::bf16) || op < 0 || op >= kTpOps)
              throw std::invalid_argument("TpComm.allreduce: dtype or op code out of range (see TP_DTYPES, TP_OPS)");
            py::gil_scoped_release release;
            c.allreduce(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), count,
                        static_cast<DType>(dtype), kTpOpTable[op]);
          },
          "allreduce(send, recv, count, dtype_code, op_code): raw addresses (send == recv: in place), codes "
          "from TP_DTYPES / TP_OPS. Unchecked: every rank passes the same count, dtype and op.")
      .def_property_readonly("transport", &TpComm::transport)
      .def_property_readonly("calls", &TpComm::calls)
      .def("take_seconds", &TpComm::take_seconds, "Seconds inside allreduce since the last call.");
  py::dict dtypes, ops;
  for (DType t : {DType::f32, DType::f64, DType::f16, DType::bf16}) dtypes[dtype_name(t)] = static_cast<int>(t);
  for (int i = 0; i < kTpOps; ++i) ops[kTpOpNames[i]] = i;
  m.attr("TP_DTYPES") = dtypes;
  m.attr("TP_OPS") = ops;
  m.def(
      "allgather_bytes",
      [](uintptr_t send, uintptr_t recv, size_t bytes, long long comm) {
        py::gil_scoped_release release;
        allgather_bytes(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), bytes,
                        mpi::from_fortran(comm, "allgather_bytes"));
      },
      py::arg("send"), py::arg("recv"), py::arg("bytes"), py::arg("comm"),
      "MPI_Allgather of `bytes` per rank into recv (ranks in order). Unchecked.");
  m.def("mpi_transport", &mpi::transport_report,
        "What the MPI library says about its transport: [(name, value)], e.g. the selected PML and MCA settings.");
  m.attr("RING_SEGMENT_BYTES") = defaults.segment_bytes;
  m.attr("RING_DEPTH") = defaults.depth;
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hpclm native kernels (CPU paths dispatched at run time, optional MPI and CUDA parts)";
  m.def("build_info", &build_info, "How this extension was built and which CPU path it uses here.");
  m.def("cuda_devices", &cuda_device_report, "CUDA devices the runtime sees: {'devices': [...], 'error': str|None}.");
  m.def("cpu_path", [] { return std::string(isa_name(selected_isa())); }, "The CPU code path in use.");
  m.def("set_cpu_path", &set_isa, py::arg("name"),
        "Use CPU path 'auto', 'scalar', 'avx2', 'avx512' or 'avx512_vnni'; ValueError if not compiled or not supported.");
  m.def("mpi_library_version", &mpi_library_version);
  m.def(
      "reduce_into",
      [](uintptr_t dst, uintptr_t src, size_t count, const std::string& dtype, const std::string& op, int threads) {
        DType t = parse_dtype(dtype);
        ReduceOp o = parse_reduce_op(op);
        py::gil_scoped_release release;
        reduce_into(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), count, t, o, threads);
      },
      py::arg("dst"), py::arg("src"), py::arg("count"), py::arg("dtype"), py::arg("op") = "sum",
      py::arg("threads") = 1,
      "dst[i] = dst[i] op src[i] over `count` contiguous elements at the given addresses.");

  // --- inference matmul (csrc/gemm/gemm.h) ---
  m.attr("GEMM_PANEL") = kGemmPanel;
  m.def(
      "gemm_packed",
      [](uintptr_t x, uintptr_t panels, uintptr_t bias, uintptr_t y, int64_t M, int64_t N, int64_t K, int64_t ldx,
         int64_t ldy, int threads) {
        GemmArgs a{reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(panels),
                   reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(y), M, N, K, ldx, ldy};
        py::gil_scoped_release release;
        gemm_packed(a, threads);
      },
      py::arg("x"), py::arg("panels"), py::arg("bias"), py::arg("y"), py::arg("M"), py::arg("N"), py::arg("K"),
      py::arg("ldx"), py::arg("ldy"), py::arg("threads") = 1,
      "CPU float32: y[M, N] = x[M, K] @ W^T + bias (bias 0: none), W packed in panels of GEMM_PANEL columns "
      "([ceil(N / GEMM_PANEL)][K][GEMM_PANEL]); row strides ldx, ldy in elements.");

  // --- weight-quantized matmul (csrc/quant/quant_matmul.h) ---
  m.attr("QUANT_PANEL") = kQuantPanel;
  m.attr("QUANT_BLOCK") = kQuantBlock;
  m.attr("QUANT_CHANNEL_MAX_K") = kQuantChannelMaxK;
  m.def(
      "quant_matmul",
      [](uintptr_t x, const std::string& x_dtype, uintptr_t weights, uintptr_t scales, uintptr_t bias, uintptr_t y,
         int64_t M, int64_t N, int64_t K, int64_t ldx, int64_t ldy, const std::string& scheme, int threads) {
        QuantScheme s;
        if (scheme == "int8-channel")
          s = QuantScheme::int8_channel;
        else if (scheme == "int8-block32")
          s = QuantScheme::int8_block32;
        else if (scheme == "int4-block32")
          s = QuantScheme::int4_block32;
        else
          throw std::invalid_argument("unknown quantization scheme '" + scheme +
                                      "': use int8-channel, int8-block32 or int4-block32");
        const DType xt = parse_dtype(x_dtype);
        if (xt != DType::f32 && xt != DType::bf16)
          throw std::invalid_argument("quant_matmul takes float32 or bfloat16 activations, not " + x_dtype);
        if (s == QuantScheme::int8_channel && K > kQuantChannelMaxK)
          throw std::invalid_argument("int8-channel sums a row's products in int32: K up to " +
                                      std::to_string(kQuantChannelMaxK) + ", not " + std::to_string(K) +
                                      " (use a block scheme)");
        QuantMatmulArgs a{reinterpret_cast<const void*>(x), xt == DType::bf16, reinterpret_cast<const uint8_t*>(weights),
                          reinterpret_cast<const void*>(scales), reinterpret_cast<const float*>(bias),
                          reinterpret_cast<float*>(y), M, N, K, ldx, ldy, s};
        py::gil_scoped_release release;
        quant_matmul(a, threads);
      },
      py::arg("x"), py::arg("x_dtype"), py::arg("weights"), py::arg("scales"), py::arg("bias"), py::arg("y"),
      py::arg("M"), py::arg("N"), py::arg("K"), py::arg("ldx"), py::arg("ldy"), py::arg("scheme"),
      py::arg("threads") = 1,
      "CPU: y[M, N] (float32) = x[M, K] (float32 or bfloat16) @ dequant(W)^T + bias (bias 0: none), W quantized "
      "(int8-channel, int8-block32, int4-block32) and packed in panels of QUANT_PANEL columns "
      "(csrc/quant/quant_matmul.h); row strides ldx, ldy in elements.");

  // --- attention of one decoding step over a KV cache (csrc/attention/decode_attention.h) ---
  m.def(
      "decode_attention",
      [](uintptr_t qkv, uintptr_t keys, uintptr_t values, uintptr_t slots, uintptr_t positions, uintptr_t y, int64_t B,
         int64_t H, int64_t D, int64_t P, int64_t ldqkv, int64_t ldy, double scale, int threads) {
        DecodeAttentionArgs a{reinterpret_cast<const float*>(qkv), reinterpret_cast<float*>(keys),
                              reinterpret_cast<float*>(values), reinterpret_cast<const int64_t*>(slots),
                              reinterpret_cast<const int64_t*>(positions), reinterpret_cast<float*>(y),
                              B, H, D, P, ldqkv, ldy, static_cast<float>(scale)};
        py::gil_scoped_release release;
        decode_attention(a, threads);
      },
      py::arg("qkv"), py::arg("keys"), py::arg("values"), py::arg("slots"), py::arg("positions"), py::arg("y"),
      py::arg("B"), py::arg("H"), py::arg("D"), py::arg("P"), py::arg("ldqkv"), py::arg("ldy"), py::arg("scale"),
      py::arg("threads") = 1,
      "CPU float32, one decoding step: for each of B sequences write its key and value (columns H*D.. and "
      "2*H*D.. of its qkv row) into the cache [slots, H, P, D] at slots[b], positions[b], then "
      "y[b] = softmax(scale * q K^T) V over positions 0..positions[b], per head (int64 slots, positions).");

  // --- softmax (csrc/softmax/softmax.h) ---
  m.def(
      "softmax_forward",
      [](uintptr_t x, uintptr_t y, const std::string& dtype, const std::vector<int64_t>& shape, double scale,
         uintptr_t mask, const std::vector<int64_t>& mask_strides, bool causal, int threads) {
        SoftmaxForward a = softmax_forward_args(x, y, dtype, shape, scale, mask, mask_strides, causal);
        py::gil_scoped_release release;
        softmax_forward(a, threads);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("shape"), py::arg("scale"), py::arg("mask") = 0,
      py::arg("mask_strides") = std::vector<int64_t>{}, py::arg("causal") = false, py::arg("threads") = 1,
      "CPU: y = softmax(scale * x, masked keys excluded) over contiguous [batch0, batch1, sq, sk] at the given "
      "addresses; mask: uint8 address (0 = none) with element strides over (batch0, batch1, sq).");
  m.def(
      "softmax_backward",
      [](uintptr_t y, uintptr_t dy, uintptr_t dx, const std::string& dtype, const std::vector<int64_t>& shape,
         double scale, bool causal, int threads) {
        SoftmaxBackward a = softmax_backward_args(y, dy, dx, dtype, shape, scale, causal);
        py::gil_scoped_release release;
        softmax_backward(a, threads);
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("dtype"), py::arg("shape"), py::arg("scale"),
      py::arg("causal") = false, py::arg("threads") = 1, "CPU: dx = scale * y * (dy - sum(dy * y)) per row.");
#ifdef HPCLM_WITH_CUDA
  m.def(
      "softmax_forward_cuda",
      [](uintptr_t x, uintptr_t y, const std::string& dtype, const std::vector<int64_t>& shape, double scale,
         uintptr_t mask, const std::vector<int64_t>& mask_strides, bool causal, int device, uintptr_t stream) {
        SoftmaxForward a = softmax_forward_args(x, y, dtype, shape, scale, mask, mask_strides, causal);
        py::gil_scoped_release release;
        softmax_forward_cuda(a, device, stream);
      },
      py::arg("x"), py::arg("y"), py::arg("dtype"), py::arg("shape"), py::arg("scale"), py::arg("mask") = 0,
      py::arg("mask_strides") = std::vector<int64_t>{}, py::arg("causal") = false, py::arg("device") = 0,
      py::arg("stream") = 0, "CUDA softmax_forward on `device`, enqueued on the cudaStream_t `stream` (an integer).");
  m.def(
      "softmax_backward_cuda",
      [](uintptr_t y, uintptr_t dy, uintptr_t dx, const std::string& dtype, const std::vector<int64_t>& shape,
         double scale, bool causal, int device, uintptr_t stream) {
        SoftmaxBackward a = softmax_backward_args(y, dy, dx, dtype, shape, scale, causal);
        py::gil_scoped_release release;
        softmax_backward_cuda(a, device, stream);
      },
      py::arg("y"), py::arg("dy"), py::arg("dx"), py::arg("dtype"), py::arg("shape"), py::arg("scale"),
      py::arg("causal") = false, py::arg("device") = 0, py::arg("stream") = 0,
      "CUDA softmax_backward on `device`, enqueued on the cudaStream_t `stream` (an integer).");
#endif

#ifdef HPCLM_WITH_MPI
  bind_comm(m);
#endif
  m.def(
      "divide_by",
      [](uintptr_t dst, size_t count, const std::string& dtype, double divisor, int threads) {
        DType t = parse_dtype(dtype);
        py::gil_scoped_release release;
        divide_by(reinterpret_cast<void*>(dst), count, t, divisor, threads);
      },
      py::arg("dst"), py::arg("count"), py::arg("dtype"), py::arg("divisor"), py::arg("threads") = 1,
      "dst[i] = dst[i] / divisor (correctly rounded; half types via float32).");
  m.def(
      "reduce_to",
      [](uintptr_t dst, uintptr_t a, uintptr_t b, size_t count, const std::string& dtype, const std::string& op,
         int threads) {
        DType t = parse_dtype(dtype);
        ReduceOp o = parse_reduce_op(op);
        py::gil_scoped_release release;
        reduce_to(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(a), reinterpret_cast<const void*>(b),
                  count, t, o, threads);
      },
      py::arg("dst"), py::arg("a"), py::arg("b"), py::arg("count"), py::arg("dtype"), py::arg("op") = "sum",
      py::arg("threads") = 1, "dst[i] = a[i] op b[i] (dst may be a or b).");
}
