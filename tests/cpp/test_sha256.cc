// SHA-256 and HMAC-SHA256 against the published test vectors (FIPS 180-4 examples,
// RFC 4231).
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "core/sha256.h"

namespace pycomm {
namespace {

std::string sha(const std::string& s) {
  auto d = Sha256::hash(s.data(), s.size());
  return toHex(d.data(), d.size());
}

std::string hmac(const std::vector<uint8_t>& key, const std::string& data) {
  auto d = HmacSha256::mac(key.data(), key.size(), data.data(), data.size());
  return toHex(d.data(), d.size());
}

TEST(Sha256, EmptyString) {
  EXPECT_EQ(sha(""), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
}

TEST(Sha256, Abc) {
  EXPECT_EQ(sha("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
}

TEST(Sha256, TwoBlockMessage) {
  EXPECT_EQ(sha("abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1");
}

TEST(Sha256, MillionAs) {
  EXPECT_EQ(sha(std::string(1000000, 'a')),
            "cdc76e5c9914fb9281a1c7e284d73e67f1809a48a497200e046d39ccc7112cd0");
}

TEST(Sha256, IncrementalEqualsOneShotAtEveryPadBoundary) {
  // Lengths around 55/56/64 exercise the one- and two-block padding paths.
  std::string msg;
  for (int i = 0; i < 200; ++i) msg.push_back(char('a' + i % 26));
  for (size_t len : {0, 1, 55, 56, 57, 63, 64, 65, 119, 120, 128, 200}) {
    for (size_t split = 0; split <= len; split += 7) {
      Sha256 h;
      h.update(msg.data(), split);
      h.update(msg.data() + split, len - split);
      auto d = h.finish();
      auto one = Sha256::hash(msg.data(), len);
      EXPECT_EQ(toHex(d.data(), d.size()), toHex(one.data(), one.size())) << len << "/" << split;
    }
  }
}

TEST(Sha256, HmacRfc4231Case1) {
  EXPECT_EQ(hmac(std::vector<uint8_t>(20, 0x0b), "Hi There"),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");
}

TEST(Sha256, HmacRfc4231Case2) {
  EXPECT_EQ(hmac({'J', 'e', 'f', 'e'}, "what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST(Sha256, HmacRfc4231Case3) {
  EXPECT_EQ(hmac(std::vector<uint8_t>(20, 0xaa), std::string(50, '\xdd')),
            "773ea91e36800e46854db8ebd09181a72959098b3ef8c122d9635514ced565fe");
}

TEST(Sha256, HmacRfc4231Case4) {
  std::vector<uint8_t> key;
  for (int i = 1; i <= 25; ++i) key.push_back(uint8_t(i));
  EXPECT_EQ(hmac(key, std::string(50, '\xcd')),
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b");
}

TEST(Sha256, HmacRfc4231Case6LongKey) {
  EXPECT_EQ(hmac(std::vector<uint8_t>(131, 0xaa),
                 "Test Using Larger Than Block-Size Key - Hash Key First"),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
}

TEST(Sha256, HmacRfc4231Case7LongKeyLongData) {
  EXPECT_EQ(hmac(std::vector<uint8_t>(131, 0xaa),
                 "This is a test using a larger than block-size key and a larger than "
                 "block-size data. The key needs to be hashed before being used by the HMAC "
                 "algorithm."),
            "9b09ffa71b942fcb27635fbcd5b0e944bfdc63644f0713938a7f51535c3a35e2");
}

TEST(Sha256, HmacIncremental) {
  std::vector<uint8_t> key(32, 7);
  std::string data = "nonce-a|nonce-b|ranks";
  HmacSha256 h(key.data(), key.size());
  h.update(data.data(), 5);
  h.update(data.data() + 5, data.size() - 5);
  auto a = h.finish();
  auto b = HmacSha256::mac(key.data(), key.size(), data.data(), data.size());
  EXPECT_TRUE(constantTimeEqual(a.data(), b.data(), a.size()));
  b[31] ^= 1;
  EXPECT_FALSE(constantTimeEqual(a.data(), b.data(), a.size()));
}

}  // namespace
}  // namespace pycomm
