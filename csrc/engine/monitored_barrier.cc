#include "engine/monitored_barrier.h"

#include <algorithm>
#include <vector>

#include "core/error.h"

namespace pycomm {

namespace {
constexpr const char* kPassed = "ok";
}  // namespace

void monitoredBarrier(Store& store, const std::string& keyPrefix, int rank, int size, uint64_t id,
                      std::chrono::milliseconds timeout, bool waitAll, std::chrono::milliseconds answerGrace) {
  using std::chrono::milliseconds;
  const std::string base = strCat(keyPrefix, "mbarrier/", id, "/");
  const std::string answerKey = base + "answer";
  if (rank != 0) {
    store.setString(strCat(base, "arrived/", rank), "1");
    std::string answer;
    try {
      answer = store.getString(answerKey, timeout + answerGrace);
    } catch (const TimeoutError&) {
      throw TimeoutError(strCat("pycomm: rank ", rank, " reached monitored_barrier #", id,
                                " but had no answer from rank 0 within ", (timeout + answerGrace).count(),
                                " ms; see rank 0's error for the rank that is missing"));
    }
    if (answer != kPassed) {
      // The first words are Gloo's (tools and tests match on them).
      throw TimeoutError(strCat("Rank ", rank, " successfully reached monitoredBarrier, but received errors while ",
                                "waiting for send/recv from rank 0 (pycomm: rank 0's answer through the store, to ",
                                "monitored_barrier #", id, "): ", answer));
    }
    return;
  }
  const auto start = std::chrono::steady_clock::now();
  std::vector<int> missing;
  bool outOfTime = false;  // the time was up before rank 0 got to the first missing rank
  for (int r = 1; r < size; ++r) {
    const auto spent = std::chrono::duration_cast<milliseconds>(std::chrono::steady_clock::now() - start);
    // Past the deadline a rank still counts if it has already checked in (a short look).
    const milliseconds left = std::max(milliseconds(1), timeout - spent);
    try {
      store.getString(strCat(base, "arrived/", r), left);
    } catch (const TimeoutError&) {
      if (missing.empty()) outOfTime = spent >= timeout;
      missing.push_back(r);
      if (!waitAll) break;
    }
  }
  if (missing.empty()) {
    store.setString(answerKey, kPassed);
    return;
  }
  std::string ranks;
  for (size_t i = 0; i < missing.size(); ++i) ranks += strCat(i ? ", " : "", missing[i]);
  // Worded as Gloo words it (tools and tests match on it).
  const std::string why =
      outOfTime && !waitAll
          ? strCat("[Rank 0]: Rank 0 timed out in monitoredBarrier after ", timeout.count(), " ms; rank ", ranks,
                   " had not arrived")
          : strCat("[Rank 0]: Rank", missing.size() > 1 ? "s " : " ", ranks, " failed to pass monitoredBarrier in ",
                   timeout.count(), " ms");
  store.setString(answerKey, why);
  throw TimeoutError(why);
}

}  // namespace pycomm
