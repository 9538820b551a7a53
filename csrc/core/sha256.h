// SHA-256 (FIPS 180-4) and HMAC-SHA256 (RFC 2104), used by the TCP transport to
// authenticate its peers during connection setup. Small and dependency-free; not a
// general-purpose crypto library (no constant-time guarantees beyond equal()).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>

namespace pycomm {

/// Incremental SHA-256: update() any number of times, then finish() once.
class Sha256 {
 public:
  /// Bytes in a digest.
  static constexpr size_t kDigestSize = 32;
  /// Bytes in one compression block.
  static constexpr size_t kBlockSize = 64;
  /// A SHA-256 digest.
  using Digest = std::array<uint8_t, kDigestSize>;

  /// Starts a new hash (the FIPS 180-4 initial state).
  Sha256();

  /// Feeds `len` bytes at `data` into the hash.
  void update(const void* data, size_t len);

  /// Pads, finishes and returns the digest. The object must not be used afterwards
  /// except through reset().
  Digest finish();

  /// Restarts the hash from the initial state.
  void reset();

  /// One-shot: the SHA-256 digest of `len` bytes at `data`.
  static Digest hash(const void* data, size_t len);

 private:
  void compress(const uint8_t* block);

  uint32_t state_[8];
  uint8_t buffer_[kBlockSize];
  size_t bufferLen_ = 0;
  uint64_t totalLen_ = 0;
};

/// Incremental HMAC-SHA256 keyed with a secret of any length.
class HmacSha256 {
 public:
  /// Starts a MAC under `keyLen` bytes of key at `key`.
  HmacSha256(const void* key, size_t keyLen);

  /// Feeds `len` bytes of message.
  void update(const void* data, size_t len);

  /// Returns the MAC of everything fed so far.
  Sha256::Digest finish();

  /// One-shot: HMAC-SHA256(key, data).
  static Sha256::Digest mac(const void* key, size_t keyLen, const void* data, size_t len);

 private:
  Sha256 inner_;
  uint8_t outerPad_[Sha256::kBlockSize];
};

/// Compares `n` bytes without an early exit (so timing does not reveal where two
/// MACs first differ).
bool constantTimeEqual(const void* a, const void* b, size_t n);

/// Lower-case hex of `n` bytes (for tests and log lines).
std::string toHex(const void* data, size_t n);

}  // namespace pycomm
