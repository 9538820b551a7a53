// A general threading tool: a thread per queue running submitted tasks in issue order,
// and the completion state a caller waits on. The engine's comm/send/recv threads and
// the compressed all-reduce's codec and receive threads are WorkQueues.
#pragma once

#include <condition_variable>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

namespace pycomm {

/// Completion state of one queued operation.
class Completion {
 public:
  /// Marks the operation finished (with `error` if it failed) and runs callbacks.
  void finish(std::exception_ptr error);

  /// Blocks until finished or `timeoutMs` (<0: forever) elapses; returns finished().
  bool waitFor(long timeoutMs);

  /// True once finish() was called.
  bool finished() const;

  /// The failure, or null.
  std::exception_ptr error() const;

  /// Runs `cb` on finish (immediately, on this thread, if already finished).
  void onFinish(std::function<void(std::exception_ptr)> cb);

 private:
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  std::exception_ptr error_;
  std::vector<std::function<void(std::exception_ptr)>> callbacks_;
};

/// A thread that runs queued tasks one at a time, in order.
class WorkQueue {
 public:
  /// Starts the thread; `name` shows in error messages and thread names.
  explicit WorkQueue(std::string name);
  /// Drains nothing: stops after the running task and fails the queued ones.
  ~WorkQueue();

  WorkQueue(const WorkQueue&) = delete;
  WorkQueue& operator=(const WorkQueue&) = delete;

  /// Queues `task`; the returned completion finishes when it has run (with the
  /// exception it threw, if any).
  std::shared_ptr<Completion> push(std::function<void()> task);

  /// Runs `task` right here on the calling thread if nothing is queued or running
  /// (a synchronous caller then skips two thread hand-offs); otherwise queues it
  /// behind the others, exactly like push(). Order is preserved either way.
  std::shared_ptr<Completion> runInlineOrPush(std::function<void()> task);

  /// Stops accepting tasks, fails queued ones with `why`, joins the thread.
  void shutdown(const std::string& why);

  /// True while a task runs (on the worker, or inline on a caller).
  bool busy();

 private:
  void loop();

  std::string name_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::pair<std::function<void()>, std::shared_ptr<Completion>>> queue_;
  bool stop_ = false;
  bool busy_ = false;  // a task is running (on the worker or inline on a caller)
  std::thread thread_;
};

}  // namespace pycomm
