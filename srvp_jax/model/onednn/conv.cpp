// XLA FFI handlers running 2-D convolutions (float32, NHWC activations, HWIO kernels) on oneDNN.
//
// One handler, three passes of the same convolution (stride s, symmetric padding p):
//   mode 0  forward:          y  = conv(x, w)         args (x, w)   -> y  (N, Ho, Wo, O)
//   mode 1  backward-data:    dx = conv^T(dy, w)      args (dy, w)  -> dx (N, H, W, C)
//   mode 2  backward-weights: dw = dconv/dw(x, dy)    args (x, dy)  -> dw (kh, kw, C, O)
// A transposed convolution is the same three passes with the roles exchanged (see ops.py).
//
// Primitives are cached by shape and pass. Kernels are handed to oneDNN in the layout it chooses
// (format_tag::any, one reorder per call): forcing HWIO selects slow GEMM or reference kernels.
// Execution is serialised by one lock: Debian's oneDNN runs on OpenMP, so every call already uses all
// of its threads, and concurrent calls from XLA's threads (several host devices) would oversubscribe
// the cores. The scratchpad is owned by the caller, so no state is shared between cached primitives.

#include <cstdint>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using tag = dnnl::memory::format_tag;
using dt = dnnl::memory::data_type;

namespace {

using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t,
                       int64_t, int64_t>;

struct Entry {
  dnnl::primitive prim;
  memory::desc weights_md;  // The kernel layout the primitive uses (mode 0 / 1: input; mode 2: output).
  memory::desc scratch_md;
  bool reorder = false;     // The kernel layout differs from HWIO.
  dnnl::reorder weights_reorder;
};

struct State {
  dnnl::engine engine{dnnl::engine::kind::cpu, 0};
  dnnl::stream stream{engine};
  std::map<Key, std::shared_ptr<Entry>> cache;
  std::vector<char> scratch, weights;
  std::mutex lock;
};

State& state() {
  static State* s = new State();  // Never destroyed: XLA may run a handler during interpreter shutdown.
  return *s;
}

char* grow(std::vector<char>& buffer, size_t bytes) {
  if (buffer.size() < bytes) buffer.resize(bytes);
  return buffer.data();
}

std::shared_ptr<Entry> make_entry(State& st, int64_t mode, int64_t n, int64_t h, int64_t w, int64_t c, int64_t ho,
                                  int64_t wo, int64_t o, int64_t k, int64_t s, int64_t p) {
  const memory::dims strides{s, s}, pad_l{p, p};
  const memory::dims pad_r{(ho - 1) * s + k - h - p, (wo - 1) * s + k - w - p};
  const memory::desc src_md({n, c, h, w}, dt::f32, tag::nhwc);
  const memory::desc dst_md({n, o, ho, wo}, dt::f32, tag::nhwc);
  const memory::desc any_md({o, c, k, k}, dt::f32, tag::any);
  const memory::desc hwio_md({o, c, k, k}, dt::f32, tag::hwio);
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  const auto algo = dnnl::algorithm::convolution_direct;
  dnnl::convolution_forward::primitive_desc fwd(
      dnnl::convolution_forward::desc(dnnl::prop_kind::forward_training, algo, src_md, any_md, dst_md, strides,
                                      pad_l, pad_r),
      attr, st.engine);
  auto e = std::make_shared<Entry>();
  if (mode == 0) {
    e->prim = dnnl::convolution_forward(fwd);
    e->weights_md = fwd.weights_desc();
    e->scratch_md = fwd.scratchpad_desc();
  } else if (mode == 1) {
    dnnl::convolution_backward_data::primitive_desc bwd(
        dnnl::convolution_backward_data::desc(algo, src_md, any_md, dst_md, strides, pad_l, pad_r), attr, st.engine,
        fwd);
    e->prim = dnnl::convolution_backward_data(bwd);
    e->weights_md = bwd.weights_desc();
    e->scratch_md = bwd.scratchpad_desc();
  } else {
    dnnl::convolution_backward_weights::primitive_desc bwd(
        dnnl::convolution_backward_weights::desc(algo, src_md, any_md, dst_md, strides, pad_l, pad_r), attr,
        st.engine, fwd);
    e->prim = dnnl::convolution_backward_weights(bwd);
    e->weights_md = bwd.diff_weights_desc();
    e->scratch_md = bwd.scratchpad_desc();
  }
  e->reorder = e->weights_md != hwio_md;
  if (e->reorder) {
    e->weights_reorder = mode == 2 ? dnnl::reorder(dnnl::reorder::primitive_desc(st.engine, e->weights_md, st.engine,
                                                                                  hwio_md))
                                   : dnnl::reorder(dnnl::reorder::primitive_desc(st.engine, hwio_md, st.engine,
                                                                                  e->weights_md));
  }
  return e;
}

ffi::Error ConvImpl(ffi::Buffer<ffi::F32> a, ffi::Buffer<ffi::F32> b, ffi::ResultBuffer<ffi::F32> out, int64_t mode,
                    int64_t stride, int64_t padding) {
  if (mode < 0 || mode > 2) return ffi::Error::InvalidArgument("srvp_onednn_conv: mode must be 0, 1 or 2");
  // Shapes: x (n, h, w, c), y (n, ho, wo, o), kernel (k, k, c, o).
  const auto da = a.dimensions(), db = b.dimensions(), dr = out->dimensions();
  if (da.size() != 4 || db.size() != 4 || dr.size() != 4) {
    return ffi::Error::InvalidArgument("srvp_onednn_conv: expected rank-4 operands");
  }
  const auto x = mode == 1 ? dr : da;
  const auto y = mode == 0 ? dr : (mode == 1 ? da : db);
  const auto kern = mode == 2 ? dr : db;
  const int64_t n = x[0], h = x[1], w = x[2], c = x[3], ho = y[1], wo = y[2], o = y[3], k = kern[0];
  if (y[0] != n || kern[1] != k || kern[2] != c || kern[3] != o) {
    return ffi::Error::InvalidArgument("srvp_onednn_conv: inconsistent operand shapes");
  }
  if (n == 0 || ho == 0 || wo == 0 || o == 0 || c == 0) {
    std::memset(out->untyped_data(), 0, out->size_bytes());
    return ffi::Error::Success();
  }
  State& st = state();
  std::lock_guard<std::mutex> guard(st.lock);
  try {
    const Key key{mode, n, h, w, c, ho, wo, o, k, stride, padding, 0};
    auto it = st.cache.find(key);
    if (it == st.cache.end()) {
      it = st.cache.emplace(key, make_entry(st, mode, n, h, w, c, ho, wo, o, k, stride, padding)).first;
    }
    Entry& e = *it->second;
    const memory::desc src_md({n, c, h, w}, dt::f32, tag::nhwc);
    const memory::desc dst_md({n, o, ho, wo}, dt::f32, tag::nhwc);
    const memory::desc hwio_md({o, c, k, k}, dt::f32, tag::hwio);
    memory scratch(e.scratch_md, st.engine, grow(st.scratch, e.scratch_md.get_size()));
    void* kernel_ptr = mode == 2 ? out->untyped_data() : b.untyped_data();
    memory user_weights(hwio_md, st.engine, kernel_ptr);
    memory weights = user_weights;
    if (e.reorder) weights = memory(e.weights_md, st.engine, grow(st.weights, e.weights_md.get_size()));
    if (mode == 0) {
      if (e.reorder) e.weights_reorder.execute(st.stream, user_weights, weights);
      e.prim.execute(st.stream, {{DNNL_ARG_SRC, memory(src_md, st.engine, a.untyped_data())},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DST, memory(dst_md, st.engine, out->untyped_data())},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
    } else if (mode == 1) {
      if (e.reorder) e.weights_reorder.execute(st.stream, user_weights, weights);
      e.prim.execute(st.stream, {{DNNL_ARG_DIFF_DST, memory(dst_md, st.engine, a.untyped_data())},
                                 {DNNL_ARG_WEIGHTS, weights},
                                 {DNNL_ARG_DIFF_SRC, memory(src_md, st.engine, out->untyped_data())},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
    } else {
      e.prim.execute(st.stream, {{DNNL_ARG_SRC, memory(src_md, st.engine, a.untyped_data())},
                                 {DNNL_ARG_DIFF_DST, memory(dst_md, st.engine, b.untyped_data())},
                                 {DNNL_ARG_DIFF_WEIGHTS, weights},
                                 {DNNL_ARG_SCRATCHPAD, scratch}});
      if (e.reorder) e.weights_reorder.execute(st.stream, weights, user_weights);
    }
    st.stream.wait();
  } catch (const dnnl::error& err) {
    return ffi::Error::Internal(std::string("srvp_onednn_conv: oneDNN: ") + err.what());
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SrvpOnednnConv, ConvImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("mode")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("padding"));
