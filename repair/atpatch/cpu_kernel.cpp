// AtPatch's CPU hot path, one function each (why and how much: repair/atpatch/cpu_kernel.py):
//
// detector_logits: the Detector (Eq. 5-6 before σ), the same arithmetic as
// ``Detector.logits_from_heads`` (repair/atpatch/detector.py, 16 torch ops per map). Per sample:
// the head sum s = H·a (Eq. 5 up to the 1/H folded into the weights), the log-ratio
// r = log(s·q/H + ε·q) to the benign map (Eq. 10), the column profile (sums and maxima over query
// rows of s and r), its lower median over columns, then per column the 1x1 convolution, the
// per-column MLP and the output unit, every weight already |w| and scaled (``Detector.prepare``).
//
// redistribute: Γ (Eq. 11), ``redistribute`` of repair/atpatch/redistribution.py.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <tuple>
#include <vector>

namespace {

// The Detector's widths (``Detector(channels=16, hidden=32)``, the only ones the build makes):
// fixed at compile time so the per-column MLP stays in vector registers.
constexpr int64_t kChannels = 16;
constexpr int64_t kHidden = 32;
constexpr int kProfile = 4;
constexpr int64_t kMaxColumns = 4096;  // tokens per map

typedef float v8 __attribute__((vector_size(32)));  // 8 columns at once (GCC vector extension)
constexpr int64_t kLanes = 8;

inline v8 load8(const float* p) {
  v8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// NaN stays NaN in relu and max, as in torch (a map with NaN gives the torch ops' logits)
inline v8 relu(v8 v) {
  const v8 zero = {};
  return v < zero ? zero : v;
}

inline float nan_max(float a, float b) { return (std::isnan(b) || b > a) ? b : a; }

// One sample: profile p (4, n_pad), its rows zero-padded from n_cols to n_pad columns, a multiple
// of 8. conv_w (4, C), neg_median_w (4, C), conv_b (C), mix_w (C, Hd), mix_b_t (Hd, n_pad),
// out_w (Hd). Vectorised over columns, so every weight is a broadcast scalar and the 32 hidden
// units are independent chains.
void column_mlp(const float* __restrict p, int64_t n_cols, int64_t n_pad, const float* __restrict conv_w,
                const float* __restrict neg_median_w, const float* __restrict conv_b,
                const float* __restrict mix_w, const float* __restrict mix_b_t,
                const float* __restrict out_w, float out_b, float* __restrict logits) {
  float sorted[kMaxColumns];
  float median[kProfile];
  // NaN orders last, as in torch's sort (and nth_element needs a strict weak ordering)
  const auto before = [](float a, float b) { return a < b || (std::isnan(b) && !std::isnan(a)); };
  for (int k = 0; k < kProfile; ++k) {  // torch.kthvalue((N + 1) // 2): the lower median
    std::copy(p + k * n_pad, p + k * n_pad + n_cols, sorted);
    std::nth_element(sorted, sorted + (n_cols - 1) / 2, sorted + n_cols, before);
    median[k] = sorted[(n_cols - 1) / 2];
  }
  float bias[kChannels];
  for (int64_t c = 0; c < kChannels; ++c) {
    float acc = conv_b[c];
    for (int k = 0; k < kProfile; ++k) acc += median[k] * neg_median_w[k * kChannels + c];
    bias[c] = acc;
  }
  for (int64_t n0 = 0; n0 < n_cols; n0 += kLanes) {
    v8 prof[kProfile];
    for (int k = 0; k < kProfile; ++k) prof[k] = load8(p + k * n_pad + n0);
    v8 z[kChannels];
    for (int64_t c = 0; c < kChannels; ++c) {
      v8 acc = bias[c] + conv_w[c] * prof[0];
      for (int k = 1; k < kProfile; ++k) acc += conv_w[k * kChannels + c] * prof[k];
      z[c] = relu(acc);
    }
    v8 out = out_b + v8{};
    for (int64_t j = 0; j < kHidden; ++j) {
      v8 h = load8(mix_b_t + j * n_pad + n0);
      for (int64_t c = 0; c < kChannels; ++c) h += mix_w[c * kHidden + j] * z[c];
      out += out_w[j] * relu(h);
    }
    for (int64_t i = 0; i < kLanes && n0 + i < n_cols; ++i) logits[n0 + i] = out[i];
  }
}

}  // namespace

// attn (B, H, Nq, N) float32; q_per_head, eps_q (Nq, N); mix_b_t (Hd, N padded to a multiple of
// kLanes with zeros, laid out once per layer by the caller); returns logits (B, N) and their
// maximum (the hot path's "nothing flagged" test reads it, one op fewer).
std::tuple<torch::Tensor, double> detector_logits(
    torch::Tensor attn, torch::Tensor q_per_head, torch::Tensor eps_q, torch::Tensor conv_w,
    torch::Tensor neg_median_w, torch::Tensor conv_b, torch::Tensor mix_w, torch::Tensor mix_b_t,
    torch::Tensor out_w, double out_b) {
  TORCH_CHECK(attn.dim() == 4 && attn.scalar_type() == torch::kFloat && attn.device().is_cpu(),
              "attention maps must be a float32 CPU tensor (B, H, Nq, N)");
  attn = attn.contiguous();
  const int64_t batch = attn.size(0), heads = attn.size(1), nq = attn.size(2), n = attn.size(3);
  const int64_t map = nq * n;
  TORCH_CHECK(n <= kMaxColumns, "maps of more than ", kMaxColumns, " tokens are not supported");
  const int64_t n_pad = (n + kLanes - 1) / kLanes * kLanes;
  TORCH_CHECK(q_per_head.numel() == map && eps_q.numel() == map && mix_b_t.numel() == kHidden * n_pad &&
                  conv_w.numel() == kProfile * kChannels && neg_median_w.numel() == kProfile * kChannels &&
                  conv_b.numel() == kChannels && mix_w.numel() == kChannels * kHidden &&
                  out_w.numel() == kHidden,
              "detector weights do not fit a map of ", nq, " x ", n, " (channels 16, hidden 32)");
  auto s = torch::empty({batch, nq, n}, attn.options());
  auto r = torch::empty({batch, nq, n}, attn.options());
  const float* a = attn.data_ptr<float>();
  float* sp = s.data_ptr<float>();
  float* rp = r.data_ptr<float>();
  const float* qh = q_per_head.data_ptr<float>();
  const float* eq = eps_q.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float* __restrict sb = sp + b * map;
      float* __restrict rb = rp + b * map;
      const float* ab = a + b * heads * map;
      std::copy(ab, ab + map, sb);
      for (int64_t h = 1; h < heads; ++h) {
        const float* __restrict ah = ab + h * map;
        for (int64_t i = 0; i < map; ++i) sb[i] += ah[i];
      }
      for (int64_t i = 0; i < map; ++i) rb[i] = eq[i] + sb[i] * qh[i];
    }
  });
  r.log_();  // ATen's vectorised log over the whole batch
  auto logits = torch::empty({batch, n}, attn.options());
  float* out = logits.data_ptr<float>();
  const float *cw = conv_w.data_ptr<float>(), *nmw = neg_median_w.data_ptr<float>();
  const float *cb = conv_b.data_ptr<float>(), *mw = mix_w.data_ptr<float>();
  const float *mb = mix_b_t.data_ptr<float>(), *ow = out_w.data_ptr<float>();
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    // rows: Σ s, Σ r, max s, max r over the query rows, each padded to n_pad columns
    std::vector<float> prof(kProfile * n_pad, 0.f);
    for (int64_t b = b0; b < b1; ++b) {
      const float* sb = sp + b * map;
      const float* rb = rp + b * map;
      float* __restrict sum_s = prof.data();
      float* __restrict sum_r = sum_s + n_pad;
      float* __restrict max_s = sum_r + n_pad;
      float* __restrict max_r = max_s + n_pad;
      std::copy(sb, sb + n, sum_s);
      std::copy(rb, rb + n, sum_r);
      std::copy(sb, sb + n, max_s);
      std::copy(rb, rb + n, max_r);
      for (int64_t q = 1; q < nq; ++q) {
        const float* __restrict sq = sb + q * n;
        const float* __restrict rq = rb + q * n;
        for (int64_t j = 0; j < n; ++j) {
          sum_s[j] += sq[j];
          sum_r[j] += rq[j];
          max_s[j] = nan_max(max_s[j], sq[j]);
          max_r[j] = nan_max(max_r[j], rq[j]);
        }
      }
      column_mlp(prof.data(), n, n_pad, cw, nmw, cb, mw, mb, ow, static_cast<float>(out_b),
                 out + b * n);
    }
  });
  const float top = batch * n ? *std::max_element(out, out + batch * n) : -INFINITY;
  return {logits, top};
}

// Γ (AtPatch Eq. 11) on attn (B, H, Nq, N) float32 for flags bool (B, N): ``redistribute`` of
// repair/atpatch/redistribution.py, element for element (its row sums in another order).
// benign (Nq, N), or an empty tensor for the masked variant (Q = 0). Samples with nothing
// flagged are copied bit for bit.
torch::Tensor redistribute(torch::Tensor attn, torch::Tensor flags, torch::Tensor benign, bool rescale) {
  TORCH_CHECK(attn.dim() == 4 && attn.scalar_type() == torch::kFloat && attn.device().is_cpu(),
              "attention maps must be a float32 CPU tensor (B, H, Nq, N)");
  attn = attn.contiguous();
  flags = flags.contiguous();
  const int64_t batch = attn.size(0), heads = attn.size(1), nq = attn.size(2), n = attn.size(3);
  const bool masked = benign.numel() == 0;
  TORCH_CHECK(flags.scalar_type() == torch::kBool && flags.numel() == batch * n,
              "flags must be bool (B, N) for maps (B, H, Nq, N)");
  TORCH_CHECK(masked || (benign.scalar_type() == torch::kFloat && benign.numel() == nq * n),
              "benign columns must be float32 (Nq, N)");
  if (!masked) benign = benign.contiguous();
  auto out = torch::empty_like(attn);
  const float* a = attn.data_ptr<float>();
  const bool* f = flags.data_ptr<bool>();
  const float* q = masked ? nullptr : benign.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const int64_t per_sample = heads * nq * n;
  at::parallel_for(0, batch, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const bool* fb = f + b * n;
      const float* ab = a + b * per_sample;
      float* ob = o + b * per_sample;
      const int64_t n_flagged = std::count(fb, fb + n, true);
      if (n_flagged == 0) {
        std::copy(ab, ab + per_sample, ob);
        continue;
      }
      const float uniform = 1.f / static_cast<float>(std::max<int64_t>(n - n_flagged, 1));
      for (int64_t hi = 0; hi < heads * nq; ++hi) {
        const float* row = ab + hi * n;
        const float* qi = masked ? nullptr : q + (hi % nq) * n;
        float* out_row = ob + hi * n;
        float rest_sum = 0.f, q_sum = 0.f;
        for (int64_t j = 0; j < n; ++j) {
          if (fb[j]) q_sum += masked ? 0.f : qi[j];
          else rest_sum += row[j];
        }
        float scale = 1.f;
        bool degenerate = false;
        if (rescale) {
          const float target = masked ? 1.f : 1.f - q_sum;
          degenerate = !(rest_sum > 1e-6f);  // almost all mass was on flagged columns: spread uniformly
          scale = target / (degenerate ? 1.f : rest_sum);
        }
        for (int64_t j = 0; j < n; ++j) {
          if (fb[j]) out_row[j] = masked ? 0.f : qi[j];
          else out_row[j] = (degenerate ? uniform : row[j]) * scale;
        }
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("detector_logits", &detector_logits, py::call_guard<py::gil_scoped_release>());
  m.def("redistribute", &redistribute, py::call_guard<py::gil_scoped_release>());
  m.attr("lanes") = kLanes;  // columns per vector: detector_logits' padding of mix_b_t
}
