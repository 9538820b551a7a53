// PowerSGD's per-matrix arithmetic (Vogels et al. 2019, as torch's powerSGD_hook does it)
// over a flat bucket: the Python side passes the layout once per call (offset, rows, cols
// and rank of every matrix-shaped parameter that is worth compressing); everything else
// in the bucket (vectors, small matrices, gaps) is sent exactly. The loops over matrices
// and their matmuls / QR run here, on ATen, with the GIL released; the two float32
// all-reduces between the steps are issued by the caller.
//
// One compressed all-reduce of a bucket x (n elements), with per-matrix error E_i and
// warm-started Q_i (cols_i x r_i, the previous call's result):
//
//   payload = [ x on the exact ranges | P_1 | P_2 | ... ],  M_i = x_i + E_i, P_i = M_i Q_i
//   payload <- all-reduce(payload)                                      (caller)
//   P_i <- orthonormal basis of P_i (reduced QR), written back into the payload
//   q_i = M_i^T P_i;  E_i <- M_i - P_i q_i^T                             (error feedback)
//   q <- all-reduce([q_1 | q_2 | ...])                                   (caller; next Q)
//   out = [ payload's exact ranges | P_i q_i^T ]
//
// Every rank runs the same QR and matmuls on bitwise-identical reduced P and q, so the
// results are identical on every rank.
#include <torch/extension.h>

#include <vector>

namespace pycomm {
namespace {

using at::Tensor;

/// The matrices of one bucket, validated against its length.
struct Layout {
  std::vector<int64_t> off, rows, cols, rank;
  std::vector<std::pair<int64_t, int64_t>> exact;  // [begin, end) ranges sent uncompressed
  int64_t exactCount = 0;
  int64_t pCount = 0;  // sum rows * rank
  int64_t qCount = 0;  // sum cols * rank
  size_t size() const { return off.size(); }
};

Layout layoutOf(int64_t n, const std::vector<int64_t>& off, const std::vector<int64_t>& rows,
                const std::vector<int64_t>& cols, const std::vector<int64_t>& rank) {
  TORCH_CHECK(rows.size() == off.size() && cols.size() == off.size() && rank.size() == off.size(),
              "powersgd layout: offsets, rows, cols and ranks must have the same length (", off.size(), ", ",
              rows.size(), ", ", cols.size(), ", ", rank.size(), ")");
  Layout l{off, rows, cols, rank, {}, 0, 0, 0};
  int64_t pos = 0;
  for (size_t i = 0; i < off.size(); ++i) {
    TORCH_CHECK(rows[i] >= 1 && cols[i] >= 1 && rank[i] >= 1 && rank[i] <= rows[i] && rank[i] <= cols[i],
                "powersgd layout: matrix ", i, " is ", rows[i], " x ", cols[i], " with rank ", rank[i],
                " (need 1 <= rank <= min(rows, cols))");
    TORCH_CHECK(off[i] >= pos, "powersgd layout: matrix ", i, " at offset ", off[i],
                " overlaps the previous one or is out of order (previous ends at ", pos, ")");
    TORCH_CHECK(off[i] + rows[i] * cols[i] <= n, "powersgd layout: matrix ", i, " (", rows[i], " x ", cols[i],
                " at offset ", off[i], ") runs past the tensor's ", n, " elements");
    if (off[i] > pos) l.exact.emplace_back(pos, off[i]);
    pos = off[i] + rows[i] * cols[i];
    l.pCount += rows[i] * rank[i];
    l.qCount += cols[i] * rank[i];
  }
  if (n > pos) l.exact.emplace_back(pos, n);
  for (const auto& e : l.exact) l.exactCount += e.second - e.first;
  return l;
}

void checkFlat(const Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "powersgd: ", what, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), "powersgd: ", what, " must be a contiguous 1-D tensor");
  TORCH_CHECK(t.numel() == n, "powersgd: ", what, " has ", t.numel(), " elements, expected ", n);
}

/// Matrix i of a flat bucket-sized tensor.
Tensor matrix(const Tensor& flat, const Layout& l, size_t i) {
  return flat.narrow(0, l.off[i], l.rows[i] * l.cols[i]).view({l.rows[i], l.cols[i]});
}

// payload = [x on the exact ranges | P_i = (x_i + E_i) Q_i], E_i <- x_i + E_i.
Tensor compressT(const Tensor& x, const Tensor& error, const Tensor& q, const std::vector<int64_t>& off,
                 const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                 const std::vector<int64_t>& rank) {
  const int64_t n = x.numel();
  const Layout l = layoutOf(n, off, rows, cols, rank);
  checkFlat(x, n, "x");
  checkFlat(error, n, "error");
  checkFlat(q, l.qCount, "q");
  TORCH_CHECK(error.device() == x.device() && q.device() == x.device(),
              "powersgd: x, error and q must be on one device");
  Tensor payload = at::empty({l.exactCount + l.pCount}, x.options());
  int64_t pos = 0;
  for (const auto& e : l.exact) {
    payload.narrow(0, pos, e.second - e.first).copy_(x.narrow(0, e.first, e.second - e.first));
    pos += e.second - e.first;
  }
  int64_t qAt = 0;
  for (size_t i = 0; i < l.size(); ++i) {
    Tensor m = matrix(error, l, i);
    m.add_(matrix(x, l, i));
    Tensor qi = q.narrow(0, qAt, l.cols[i] * l.rank[i]).view({l.cols[i], l.rank[i]});
    Tensor p = payload.narrow(0, pos, l.rows[i] * l.rank[i]).view({l.rows[i], l.rank[i]});
    at::mm_out(p, m, qi);
    pos += l.rows[i] * l.rank[i];
    qAt += l.cols[i] * l.rank[i];
  }
  return payload;
}

// On the reduced payload: P_i <- QR(P_i).Q (in place); q_i = M_i^T P_i; E_i <- M_i - P_i q_i^T.
Tensor projectT(const Tensor& error, const Tensor& payload, const std::vector<int64_t>& off,
                const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                const std::vector<int64_t>& rank) {
  const int64_t n = error.numel();
  const Layout l = layoutOf(n, off, rows, cols, rank);
  checkFlat(error, n, "error");
  checkFlat(payload, l.exactCount + l.pCount, "payload");
  TORCH_CHECK(payload.device() == error.device(), "powersgd: error and payload must be on one device");
  Tensor q = at::empty({l.qCount}, error.options());
  int64_t pos = l.exactCount, qAt = 0;
  for (size_t i = 0; i < l.size(); ++i) {
    Tensor p = payload.narrow(0, pos, l.rows[i] * l.rank[i]).view({l.rows[i], l.rank[i]});
    p.copy_(std::get<0>(at::linalg_qr(p, "reduced")));
    Tensor m = matrix(error, l, i);
    Tensor qi = q.narrow(0, qAt, l.cols[i] * l.rank[i]).view({l.cols[i], l.rank[i]});
    at::mm_out(qi, m.t(), p);
    m.sub_(at::mm(p, qi.t()));
    pos += l.rows[i] * l.rank[i];
    qAt += l.cols[i] * l.rank[i];
  }
  return q;
}

// out = [payload's exact ranges | P_i q_i^T].
void decompressT(const Tensor& out, const Tensor& payload, const Tensor& q, const std::vector<int64_t>& off,
                 const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                 const std::vector<int64_t>& rank) {
  const int64_t n = out.numel();
  const Layout l = layoutOf(n, off, rows, cols, rank);
  checkFlat(out, n, "out");
  checkFlat(payload, l.exactCount + l.pCount, "payload");
  checkFlat(q, l.qCount, "q");
  TORCH_CHECK(payload.device() == out.device() && q.device() == out.device(),
              "powersgd: out, payload and q must be on one device");
  int64_t pos = 0;
  for (const auto& e : l.exact) {
    out.narrow(0, e.first, e.second - e.first).copy_(payload.narrow(0, pos, e.second - e.first));
    pos += e.second - e.first;
  }
  int64_t qAt = 0;
  for (size_t i = 0; i < l.size(); ++i) {
    Tensor p = payload.narrow(0, pos, l.rows[i] * l.rank[i]).view({l.rows[i], l.rank[i]});
    Tensor qi = q.narrow(0, qAt, l.cols[i] * l.rank[i]).view({l.cols[i], l.rank[i]});
    Tensor o = matrix(out, l, i);
    at::mm_out(o, p, qi.t());
    pos += l.rows[i] * l.rank[i];
    qAt += l.cols[i] * l.rank[i];
  }
}

}  // namespace

/// Registers PowerSGD's per-matrix steps on pycomm._C.
void initPowerSgdBindings(pybind11::module_& m) {
  namespace py = pybind11;
  using py::arg;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("powersgd_payload_sizes",
        [](int64_t n, const std::vector<int64_t>& off, const std::vector<int64_t>& rows,
           const std::vector<int64_t>& cols, const std::vector<int64_t>& rank) {
          Layout l = layoutOf(n, off, rows, cols, rank);
          return py::make_tuple(l.exactCount, l.pCount, l.qCount);
        },
        arg("n"), arg("offsets"), arg("rows"), arg("cols"), arg("ranks"),
        "(exact elements, sum rows*rank, sum cols*rank) of a bucket layout (validates it).");
  m.def("powersgd_compress", &compressT, arg("x"), arg("error"), arg("q"), arg("offsets"), arg("rows"),
        arg("cols"), arg("ranks"), nogil,
        "Adds x into the error on every matrix and returns [x's exact ranges | P_i = M_i Q_i].");
  m.def("powersgd_project", &projectT, arg("error"), arg("payload"), arg("offsets"), arg("rows"), arg("cols"),
        arg("ranks"), nogil,
        "Orthonormalises every P_i of the reduced payload in place, returns [q_i = M_i^T P_i] and leaves "
        "M_i - P_i q_i^T in the error.");
  m.def("powersgd_decompress", &decompressT, arg("out"), arg("payload"), arg("q"), arg("offsets"), arg("rows"),
        arg("cols"), arg("ranks"), nogil, "out = [payload's exact ranges | P_i q_i^T].");
}

}  // namespace pycomm
