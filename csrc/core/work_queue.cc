#include "core/work_queue.h"

#include <pthread.h>

#include <chrono>

#include "core/error.h"

namespace pycomm {

void Completion::finish(std::exception_ptr error) {
  std::vector<std::function<void(std::exception_ptr)>> cbs;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (done_) return;
    done_ = true;
    error_ = error;
    cbs.swap(callbacks_);
  }
  cv_.notify_all();
  for (auto& cb : cbs) cb(error);
}

bool Completion::waitFor(long timeoutMs) {
  std::unique_lock<std::mutex> g(mu_);
  if (timeoutMs < 0) {
    cv_.wait(g, [&] { return done_; });
    return true;
  }
  return cv_.wait_for(g, std::chrono::milliseconds(timeoutMs), [&] { return done_; });
}

bool Completion::finished() const {
  std::lock_guard<std::mutex> g(mu_);
  return done_;
}

std::exception_ptr Completion::error() const {
  std::lock_guard<std::mutex> g(mu_);
  return error_;
}

void Completion::onFinish(std::function<void(std::exception_ptr)> cb) {
  std::exception_ptr err;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (!done_) {
      callbacks_.push_back(std::move(cb));
      return;
    }
    err = error_;
  }
  cb(err);
}

WorkQueue::WorkQueue(std::string name) : name_(std::move(name)) {
  thread_ = std::thread([this] { loop(); });
  pthread_setname_np(thread_.native_handle(), name_.substr(0, 15).c_str());
}

WorkQueue::~WorkQueue() { shutdown("pycomm: process group destroyed before the operation ran"); }

std::shared_ptr<Completion> WorkQueue::push(std::function<void()> task) {
  auto c = std::make_shared<Completion>();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) throw Error("pycomm: operation submitted to a process group that was shut down");
    queue_.emplace_back(std::move(task), c);
  }
  cv_.notify_one();
  return c;
}

std::shared_ptr<Completion> WorkQueue::runInlineOrPush(std::function<void()> task) {
  auto c = std::make_shared<Completion>();
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_) throw Error("pycomm: operation submitted to a process group that was shut down");
    if (!queue_.empty() || busy_) {
      queue_.emplace_back(std::move(task), c);
      cv_.notify_one();
      return c;
    }
    busy_ = true;  // the worker will not start anything until we are done
  }
  std::exception_ptr err;
  try {
    task();
  } catch (...) {
    err = std::current_exception();
  }
  task = nullptr;
  {
    std::lock_guard<std::mutex> g(mu_);
    busy_ = false;
  }
  cv_.notify_all();
  c->finish(err);
  return c;
}

bool WorkQueue::busy() {
  std::lock_guard<std::mutex> g(mu_);
  return busy_;
}

void WorkQueue::shutdown(const std::string& why) {
  std::deque<std::pair<std::function<void()>, std::shared_ptr<Completion>>> left;
  {
    std::lock_guard<std::mutex> g(mu_);
    if (stop_ && !thread_.joinable()) return;
    stop_ = true;
    left.swap(queue_);
  }
  cv_.notify_all();
  for (auto& item : left) item.second->finish(std::make_exception_ptr(Error(why)));
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

void WorkQueue::loop() {
  while (true) {
    std::pair<std::function<void()>, std::shared_ptr<Completion>> item;
    {
      std::unique_lock<std::mutex> g(mu_);
      cv_.wait(g, [&] { return stop_ || (!queue_.empty() && !busy_); });
      if (queue_.empty()) return;  // stopping
      item = std::move(queue_.front());
      queue_.pop_front();
      busy_ = true;
    }
    std::exception_ptr err;
    try {
      item.first();
    } catch (...) {
      err = std::current_exception();
    }
    item.first = nullptr;  // release captured buffers before waking the waiter
    {
      std::lock_guard<std::mutex> g(mu_);
      busy_ = false;
    }
    cv_.notify_all();
    item.second->finish(err);
  }
}

}  // namespace pycomm
