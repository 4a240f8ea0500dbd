// Fused CPU kernels for the per-parameter work of a DP-SAT step:
//   DpsatNoisyMean: the noisy mean of DP-SGD, (sum + N(0, stddev^2)) /
//     divisor, for a list of float32 tensors in one multithreaded pass;
//   DpsatNoisySgd: the same noisy mean for one variable, fused with the SGD
//     (momentum) update that consumes it;
//   DpsatPerturb: DP-SAT's evaluation point w + rho * d / (||d|| + 1e-16);
//   DpsatPhiloxWords: the raw generator output, for tests.
// Built by `python -m tf_dpsat.native` (tf_dpsat/native/__init__.py).
//
// TensorFlow's CPU normal sampler draws Philox uniforms in one kernel and
// transforms them scalar by scalar in another; for the few hundred thousand
// parameters of a small model that costs as much as a training step's
// matrix products. Here each chunk of 1024 values is generated, transformed
// (Box-Muller, with Eigen's vectorized log/sin/cos) and written while it is
// in L1 cache, and chunks are shared among TensorFlow's worker threads.
//
// Randomness: Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random
// numbers: as easy as 1, 2, 3", SC 2011), the generator of TensorFlow's
// stateless random ops. Key = seed[0]; the 128-bit counter is, from its low
// word up, (block, stream, seed[1]) with 32, 32 and 64 bits, where block
// numbers the 4-word outputs along the concatenation of all tensors (each
// tensor starting on a chunk boundary). The optimizer passes its noise seed,
// the step and (query, replica): every draw gets counters of its own. The
// output is a pure function of (seed, stream), whatever the threads.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>
#include <vector>

#include "Eigen/Core"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/platform/threadpool.h"

namespace tf_dpsat {
namespace {

using ::tensorflow::DEVICE_CPU;
using ::tensorflow::OpInputList;
using ::tensorflow::OpKernel;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::OpOutputList;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;

constexpr int kBlocks = 256;             // Philox blocks per chunk
constexpr int kChunk = 4 * kBlocks;      // values per chunk
constexpr int kHalf = kChunk / 2;        // Box-Muller pairs per chunk
constexpr uint32_t kMul0 = 0xD2511F53u;  // Philox4x32 multipliers
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;  // key schedule increments
constexpr uint32_t kWeyl1 = 0xBB67AE85u;
// Cost estimates in CPU cycles per value (measured single-threaded on a
// 2.6 GHz AMD EPYC: Philox 0.32 ns and Box-Muller 0.55 ns per value). Work
// below kMinHelperCycles per extra thread runs on the calling thread alone:
// waking a thread took tens of microseconds on a 2-vCPU virtual machine.
constexpr int64_t kNoisyMeanCycles = 3;
constexpr int64_t kNoisySgdCycles = 4;
constexpr int64_t kNormCycles = 2;
constexpr int64_t kPerturbCycles = 3;
constexpr int64_t kMinHelperCycles = 100000;

// Runs work(i, i + 1) for every i < items on the calling thread and on
// helpers from TensorFlow's intra-op pool, each taking the next item from a
// shared counter. tensorflow::Shard splits the range in advance and waits
// for every part, so a pool thread busy with another op of the step (a
// norm, a matrix product) held up the whole kernel; here the caller takes
// whatever no helper has claimed and waits only for items in progress.
// A helper that starts after the last item was claimed does nothing.
void ParallelFor(const OpKernelContext* ctx, int64_t items,
                 int64_t cycles_per_item,
                 const std::function<void(int64_t, int64_t)>& work) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  const auto* workers = ctx->device()->tensorflow_cpu_worker_threads();
  const int64_t helpers = std::min<int64_t>(
      {workers->num_threads - 1, items - 1,
       items * cycles_per_item / kMinHelperCycles});
  auto progress = std::make_shared<Progress>();
  auto run = [items](Progress* p,
                     const std::function<void(int64_t, int64_t)>* w) {
    for (int64_t i = p->next.fetch_add(1); i < items;
         i = p->next.fetch_add(1)) {
      (*w)(i, i + 1);
      p->finished.fetch_add(1);
    }
  };
  for (int64_t h = 0; h < helpers; ++h) {
    // `work` outlives every item a helper claims: the caller returns only
    // once all items have finished.
    workers->workers->Schedule(
        [progress, run, w = &work] { run(progress.get(), w); });
  }
  run(progress.get(), &work);
  while (progress->finished.load() < items) std::this_thread::yield();
}

// Philox4x32-10 of counters (first + j, c_hi) for j < kBlocks, with the
// blocks held as four separate word arrays so the compiler vectorizes the
// rounds across blocks. Word w of block j lands in out[w * kBlocks + j].
void PhiloxChunk(uint64_t first, uint64_t c_hi, uint64_t key,
                 uint32_t* __restrict out) {
  uint32_t* __restrict c0 = out;
  uint32_t* __restrict c1 = out + kBlocks;
  uint32_t* __restrict c2 = out + 2 * kBlocks;
  uint32_t* __restrict c3 = out + 3 * kBlocks;
  for (int j = 0; j < kBlocks; ++j) {
    const uint64_t ctr = first + j;
    c0[j] = static_cast<uint32_t>(ctr);
    c1[j] = static_cast<uint32_t>(ctr >> 32);
    c2[j] = static_cast<uint32_t>(c_hi);
    c3[j] = static_cast<uint32_t>(c_hi >> 32);
  }
  uint32_t k0 = static_cast<uint32_t>(key);
  uint32_t k1 = static_cast<uint32_t>(key >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int j = 0; j < kBlocks; ++j) {
      const uint64_t p0 = static_cast<uint64_t>(kMul0) * c0[j];
      const uint64_t p1 = static_cast<uint64_t>(kMul1) * c2[j];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1[j] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3[j] ^ k1;
      c1[j] = static_cast<uint32_t>(p1);
      c3[j] = static_cast<uint32_t>(p0);
      c0[j] = n0;
      c2[j] = n2;
    }
    k0 += kWeyl0;
    k1 += kWeyl1;
  }
}

// kChunk standard normals from one chunk of Philox words: u1 in (0, 1] and
// u2 in [0, 1) from the top 24 bits of a word each, then
// sqrt(-2 ln u1) * (cos, sin)(2 pi u2), so |z| <= sqrt(48 ln 2) ~ 5.77.
void NormalChunk(const uint32_t* bits, float* __restrict z) {
  alignas(64) float u1[kHalf];
  alignas(64) float u2[kHalf];
  constexpr float kScale = 1.0f / 16777216.0f;  // 2^-24
  for (int j = 0; j < kHalf; ++j) {
    u1[j] = static_cast<float>((bits[j] >> 8) + 1u) * kScale;
    u2[j] = static_cast<float>(bits[kHalf + j] >> 8) * kScale;
  }
  Eigen::Map<Eigen::ArrayXf> a(u1, kHalf), b(u2, kHalf);
  Eigen::Map<Eigen::ArrayXf> cos_half(z, kHalf), sin_half(z + kHalf, kHalf);
  a = (-2.0f * a.log()).sqrt();
  b *= 6.28318530717958647692f;
  cos_half = a * b.cos();
  sin_half = a * b.sin();
}

// Where a draw's noise comes from: the Philox key, the counter's high 64
// bits and its stream word (already shifted into place).
struct NoiseSource {
  uint64_t key;
  uint64_t c_hi;
  uint64_t stream_bits;
};

// Checks and reads the seed (int64 [2]) and stream (int64 scalar) inputs.
absl::Status ReadNoiseSource(const Tensor& seed, const Tensor& stream_t,
                             NoiseSource* source) {
  if (seed.NumElements() != 2) {
    return absl::InvalidArgumentError("Expected a seed of 2 elements.");
  }
  if (stream_t.NumElements() != 1) {
    return absl::InvalidArgumentError("Expected a scalar stream.");
  }
  const int64_t stream = stream_t.flat<int64_t>()(0);
  if (stream < 0 || stream >= (int64_t{1} << 32)) {
    return absl::InvalidArgumentError("Expected 0 <= stream < 2^32.");
  }
  source->key = static_cast<uint64_t>(seed.flat<int64_t>()(0));
  source->c_hi = static_cast<uint64_t>(seed.flat<int64_t>()(1));
  source->stream_bits = static_cast<uint64_t>(stream) << 32;
  return absl::OkStatus();
}

// y = (x + stddev * z) / divisor for the n <= kChunk values of chunk
// `chunk` of the concatenation, which owns Philox blocks [chunk * kBlocks,
// (chunk + 1) * kBlocks) of the source's stream.
void NoisyMeanChunk(const NoiseSource& source, uint64_t chunk, const float* x,
                    int64_t n, float stddev, float divisor, float* y) {
  alignas(64) uint32_t bits[kChunk];
  alignas(64) float z[kChunk];
  PhiloxChunk(source.stream_bits | (chunk * kBlocks), source.c_hi, source.key,
              bits);
  NormalChunk(bits, z);
  for (int64_t j = 0; j < n; ++j) y[j] = (x[j] + stddev * z[j]) / divisor;
}

class NoisyMeanOp : public OpKernel {
 public:
  explicit NoisyMeanOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OpInputList sums;
    OP_REQUIRES_OK(ctx, ctx->input_list("sums", &sums));
    NoiseSource source;
    OP_REQUIRES_OK(ctx, ReadNoiseSource(ctx->input(sums.size()),
                                        ctx->input(sums.size() + 1), &source));
    const Tensor& stddev_t = ctx->input(sums.size() + 2);
    const Tensor& divisor_t = ctx->input(sums.size() + 3);
    OP_REQUIRES(ctx, stddev_t.NumElements() == 1 && divisor_t.NumElements() == 1,
                absl::InvalidArgumentError("Expected scalar stddev and divisor."));
    const float stddev = stddev_t.scalar<float>()();
    const float divisor = divisor_t.scalar<float>()();

    OpOutputList outs;
    OP_REQUIRES_OK(ctx, ctx->output_list("noisy", &outs));
    // Chunk c covers values [start, start + kChunk) of tensor tensor_of[c].
    std::vector<int> tensor_of;
    std::vector<int64_t> start_of;
    std::vector<const float*> in(sums.size());
    std::vector<float*> out(sums.size());
    std::vector<int64_t> size(sums.size());
    for (int i = 0; i < sums.size(); ++i) {
      Tensor* o = nullptr;
      OP_REQUIRES_OK(ctx, outs.allocate(i, sums[i].shape(), &o));
      in[i] = sums[i].flat<float>().data();
      out[i] = o->flat<float>().data();
      size[i] = sums[i].NumElements();
      for (int64_t s = 0; s < size[i]; s += kChunk) {
        tensor_of.push_back(i);
        start_of.push_back(s);
      }
    }
    // Block numbers must stay below 2^32 (the stream owns the next word).
    OP_REQUIRES(ctx, static_cast<uint64_t>(tensor_of.size()) * kBlocks <
                         (uint64_t{1} << 32),
                absl::InvalidArgumentError("More than 2^34 noise values."));
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int i = tensor_of[c];
        const int64_t s = start_of[c];
        NoisyMeanChunk(source, static_cast<uint64_t>(c), in[i] + s,
                       std::min<int64_t>(kChunk, size[i] - s), stddev, divisor,
                       out[i] + s);
      }
    };
    // Each chunk draws kChunk values, however few of them its tensor uses.
    ParallelFor(ctx, static_cast<int64_t>(tensor_of.size()),
                kNoisyMeanCycles * kChunk, work);
  }
};

// The same operations, in the same order, as update_step's (keras SGD).
void SgdUpdate(int64_t n, const float* __restrict g, const float* __restrict w,
               float lr, float* __restrict w2) {
  for (int64_t j = 0; j < n; ++j) w2[j] = w[j] - g[j] * lr;
}

template <bool kNesterov>
void MomentumUpdate(int64_t n, const float* __restrict g,
                    const float* __restrict w, const float* __restrict v,
                    float lr, float momentum, float* __restrict w2,
                    float* __restrict v2) {
  for (int64_t j = 0; j < n; ++j) {
    const float v_new = v[j] * momentum - g[j] * lr;
    v2[j] = v_new;
    w2[j] = kNesterov ? w[j] + (v_new * momentum - g[j] * lr) : w[j] + v_new;
  }
}

// DpsatNoisySgd: for one variable w with SGD velocity v, the noisy mean
// g = (sum + stddev * z) / divisor and, in the same pass, Keras's SGD update:
//   v' = momentum * v - lr * g,  w' = w + v'  (nesterov: w + momentum * v' -
//   lr * g);  without momentum w' = w - lr * g.
// z is the noise DpsatNoisyMean draws for this variable when the variable
// starts at chunk `first_chunk` of the concatenation, so the fused update
// adds exactly the noise of the unfused one. Outputs w', v' (empty without
// momentum) and g (DP-SAT keeps it for the next step's perturbation).
class NoisySgdOp : public OpKernel {
 public:
  explicit NoisySgdOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("nesterov", &nesterov_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("use_momentum", &use_momentum_));
  }

  void Compute(OpKernelContext* ctx) override {
    const Tensor& sum = ctx->input(0);
    const Tensor& param = ctx->input(1);
    const Tensor& velocity = ctx->input(2);
    OP_REQUIRES(ctx, sum.shape() == param.shape(),
                absl::InvalidArgumentError("Expected sum and param of equal shapes."));
    OP_REQUIRES(ctx, !use_momentum_ || velocity.shape() == param.shape(),
                absl::InvalidArgumentError(
                    "Expected velocity and param of equal shapes."));
    float scalars[4];  // stddev, divisor, learning rate, momentum
    for (int k = 0; k < 4; ++k) {
      const Tensor& t = ctx->input(6 + k);
      OP_REQUIRES(ctx, t.NumElements() == 1,
                  absl::InvalidArgumentError("Expected scalar hyperparameters."));
      scalars[k] = t.flat<float>()(0);
    }
    const float stddev = scalars[0], divisor = scalars[1], lr = scalars[2],
                momentum = scalars[3];
    NoiseSource source;
    OP_REQUIRES_OK(ctx, ReadNoiseSource(ctx->input(3), ctx->input(4), &source));
    OP_REQUIRES(ctx, ctx->input(5).NumElements() == 1,
                absl::InvalidArgumentError("Expected a scalar first_chunk."));
    const int64_t first_chunk = ctx->input(5).flat<int64_t>()(0);
    const int64_t size = param.NumElements();
    const int64_t chunks = (size + kChunk - 1) / kChunk;
    OP_REQUIRES(ctx, first_chunk >= 0 &&
                         static_cast<uint64_t>(first_chunk + chunks) * kBlocks <
                             (uint64_t{1} << 32),
                absl::InvalidArgumentError(
                    "Expected 0 <= first_chunk and blocks below 2^32."));

    Tensor *w_out = nullptr, *v_out = nullptr, *g_out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(0, param.shape(), &w_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            1, use_momentum_ ? param.shape() : TensorShape({0}),
                            &v_out));
    OP_REQUIRES_OK(ctx, ctx->allocate_output(2, param.shape(), &g_out));
    const float* x = sum.flat<float>().data();
    const float* w = param.flat<float>().data();
    const float* v = use_momentum_ ? velocity.flat<float>().data() : nullptr;
    float* w2 = w_out->flat<float>().data();
    float* v2 = use_momentum_ ? v_out->flat<float>().data() : nullptr;
    float* g2 = g_out->flat<float>().data();
    const bool nesterov = nesterov_;
    const bool use_momentum = use_momentum_;
    auto work = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t s = c * kChunk;
        const int64_t n = std::min<int64_t>(kChunk, size - s);
        NoisyMeanChunk(source, static_cast<uint64_t>(first_chunk + c), x + s, n,
                       stddev, divisor, g2 + s);
        const float* g = g2 + s;
        if (!use_momentum) {
          SgdUpdate(n, g, w + s, lr, w2 + s);
        } else if (nesterov) {
          MomentumUpdate<true>(n, g, w + s, v + s, lr, momentum, w2 + s, v2 + s);
        } else {
          MomentumUpdate<false>(n, g, w + s, v + s, lr, momentum, w2 + s, v2 + s);
        }
      }
    };
    ParallelFor(ctx, chunks, kNoisySgdCycles * kChunk, work);
  }

 private:
  bool nesterov_;
  bool use_momentum_;
};

// Not SetIsStateful: the outputs are a pure function of the inputs (the
// noise of (seed, stream)). tf.function runs stateful ops in program order,
// which made each variable's update wait for the previous one's.
REGISTER_OP("DpsatNoisySgd")
    .Input("sum: float")
    .Input("param: float")
    .Input("velocity: float")
    .Input("seed: int64")
    .Input("stream: int64")
    .Input("first_chunk: int64")
    .Input("stddev: float")
    .Input("divisor: float")
    .Input("learning_rate: float")
    .Input("momentum: float")
    .Output("param_out: float")
    .Output("velocity_out: float")
    .Output("gradient: float")
    .Attr("nesterov: bool = false")
    .Attr("use_momentum: bool = true")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      bool use_momentum;
      TF_RETURN_IF_ERROR(c->GetAttr("use_momentum", &use_momentum));
      c->set_output(0, c->input(1));
      c->set_output(1, use_momentum ? c->input(1) : c->Vector(0));
      c->set_output(2, c->input(1));
      return absl::OkStatus();
    })
    .Doc("Noisy mean of one variable's clipped sum and the SGD update with it.");

REGISTER_KERNEL_BUILDER(Name("DpsatNoisySgd").Device(DEVICE_CPU), NoisySgdOp);

REGISTER_OP("DpsatNoisyMean")
    .Input("sums: N * float")
    .Input("seed: int64")
    .Input("stream: int64")
    .Input("stddev: float")
    .Input("divisor: float")
    .Output("noisy: N * float")
    .Attr("N: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    })
    .Doc("(sums[i] + N(0, stddev^2)) / divisor, a pure function of "
         "(seed, stream).");

REGISTER_KERNEL_BUILDER(Name("DpsatNoisyMean").Device(DEVICE_CPU), NoisyMeanOp);

// DpsatPerturb: the DP-SAT evaluation point, params[i] + rho * d[i] / (||d||
// + 1e-16) with ||d|| the L2 norm over all tensors of d, in two
// multithreaded passes (norm, then update) instead of ~5 ops per tensor.
// The norm's partial sums are per span (float, by Eigen), added in double
// in span order: the result does not depend on the threads.
class PerturbOp : public OpKernel {
 public:
  explicit PerturbOp(OpKernelConstruction* ctx) : OpKernel(ctx) {}

  void Compute(OpKernelContext* ctx) override {
    OpInputList params, dirs;
    OP_REQUIRES_OK(ctx, ctx->input_list("params", &params));
    OP_REQUIRES_OK(ctx, ctx->input_list("directions", &dirs));
    const Tensor& rho_t = ctx->input(2 * params.size());
    OP_REQUIRES(ctx, rho_t.NumElements() == 1,
                absl::InvalidArgumentError("Expected a scalar rho."));
    const float rho = rho_t.scalar<float>()();
    OpOutputList outs;
    OP_REQUIRES_OK(ctx, ctx->output_list("perturbed", &outs));
    constexpr int64_t kSpan = 16 * kChunk;
    std::vector<int> tensor_of;
    std::vector<int64_t> start_of;
    int64_t values = 0;
    for (int i = 0; i < params.size(); ++i) {
      values += params[i].NumElements();
      OP_REQUIRES(ctx, params[i].shape() == dirs[i].shape(),
                  absl::InvalidArgumentError(
                      "Expected params and directions of equal shapes."));
      Tensor* o = nullptr;
      OP_REQUIRES_OK(ctx, outs.allocate(i, params[i].shape(), &o));
      for (int64_t s = 0; s < params[i].NumElements(); s += kSpan) {
        tensor_of.push_back(i);
        start_of.push_back(s);
      }
    }
    const int64_t spans = static_cast<int64_t>(tensor_of.size());
    // A bias is one short span: cost the spans by their mean length.
    const int64_t span_values =
        std::max<int64_t>(1, values / std::max<int64_t>(1, spans));
    auto extent = [&](int64_t c, int64_t* n) {
      *n = std::min<int64_t>(kSpan,
                             params[tensor_of[c]].NumElements() - start_of[c]);
      return start_of[c];
    };
    std::vector<double> partial(spans, 0.0);
    auto norms = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t n;
        const int64_t s = extent(c, &n);
        const float* d = dirs[tensor_of[c]].flat<float>().data() + s;
        // Eigen's packet reduction: vectorized (a plain loop is not, since
        // the compiler may not reorder a float sum).
        partial[c] = Eigen::Map<const Eigen::ArrayXf>(d, n).square().sum();
      }
    };
    ParallelFor(ctx, spans, kNormCycles * span_values, norms);
    double total = 0.0;
    for (double p : partial) total += p;
    const float scale =
        rho / (static_cast<float>(std::sqrt(total)) + 1e-16f);
    auto update = [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t n;
        const int64_t s = extent(c, &n);
        const int i = tensor_of[c];
        const float* p = params[i].flat<float>().data() + s;
        const float* d = dirs[i].flat<float>().data() + s;
        float* y = (*outs[i]).flat<float>().data() + s;
        for (int64_t j = 0; j < n; ++j) y[j] = p[j] + scale * d[j];
      }
    };
    ParallelFor(ctx, spans, kPerturbCycles * span_values, update);
  }
};

REGISTER_OP("DpsatPerturb")
    .Input("params: N * float")
    .Input("directions: N * float")
    .Input("rho: float")
    .Output("perturbed: N * float")
    .Attr("N: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      for (int i = 0; i < c->num_outputs(); ++i) c->set_output(i, c->input(i));
      return absl::OkStatus();
    })
    .Doc("params[i] + rho * directions[i] / (||directions|| + 1e-16).");

REGISTER_KERNEL_BUILDER(Name("DpsatPerturb").Device(DEVICE_CPU), PerturbOp);

// The raw Philox words behind DpsatNoisyMean, in TensorFlow's order (block
// by block, 4 words each): tests compare them with TensorFlow's own Philox
// (StatelessRandomUniformFullIntV2 with key = key, counter = (first, c_hi)).
class PhiloxWordsOp : public OpKernel {
 public:
  explicit PhiloxWordsOp(OpKernelConstruction* ctx) : OpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("blocks", &blocks_));
  }

  void Compute(OpKernelContext* ctx) override {
    const auto key = static_cast<uint64_t>(ctx->input(0).scalar<int64_t>()());
    const auto c_hi = static_cast<uint64_t>(ctx->input(1).scalar<int64_t>()());
    const auto first = static_cast<uint64_t>(ctx->input(2).scalar<int64_t>()());
    Tensor* out = nullptr;
    OP_REQUIRES_OK(ctx, ctx->allocate_output(
                            0, TensorShape({4 * static_cast<int64_t>(blocks_)}),
                            &out));
    auto words = out->flat<uint32_t>();
    alignas(64) uint32_t bits[kChunk];
    for (int64_t done = 0; done < blocks_; done += kBlocks) {
      PhiloxChunk(first + done, c_hi, key, bits);
      for (int64_t j = 0; j < kBlocks && done + j < blocks_; ++j) {
        for (int w = 0; w < 4; ++w) words(4 * (done + j) + w) = bits[w * kBlocks + j];
      }
    }
  }

 private:
  int blocks_;
};

REGISTER_OP("DpsatPhiloxWords")
    .Input("key: int64")
    .Input("counter_hi: int64")
    .Input("first_block: int64")
    .Output("words: uint32")
    .Attr("blocks: int >= 1")
    .SetShapeFn([](::tensorflow::shape_inference::InferenceContext* c) {
      int blocks;
      TF_RETURN_IF_ERROR(c->GetAttr("blocks", &blocks));
      c->set_output(0, c->Vector(4 * static_cast<int64_t>(blocks)));
      return absl::OkStatus();
    });

REGISTER_KERNEL_BUILDER(Name("DpsatPhiloxWords").Device(DEVICE_CPU), PhiloxWordsOp);

}  // namespace
}  // namespace tf_dpsat
