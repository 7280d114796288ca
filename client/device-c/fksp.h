/*
 * fksp.h - streaming, constant-memory decoder for FKSP v1 sealed payloads.
 *
 * Specification: docs/sealed-payload-v1.md ("FKSP v1"). Section names in the
 * comments below ("spec: Header", "spec: Decoding on a device, step 3", ...)
 * refer to that document.
 *
 * The decoder is a push parser: the caller feeds the payload in chunks of any
 * size (one byte at a time works) as it arrives from the network, and the
 * decoder hands plaintext to a write callback one segment at a time, and only
 * after that segment's AES-GCM tag has verified. Memory use is constant: the
 * context (a few hundred bytes plus the mbedTLS GCM/SHA-256 state) and one
 * caller-provided segment buffer of S + 16 bytes (S = the payload's segment
 * size, at most 1 MiB; 4096 + 16 for the default S).
 *
 * Typical use:
 *
 *     fksp_ctx ctx;
 *     fksp_init(&ctx, &device, seg_buf, sizeof seg_buf);
 *     while ((n = receive(chunk, sizeof chunk)) > 0)
 *         if (fksp_feed(&ctx, chunk, n, write_to_ota, &ota) != FKSP_OK)
 *             break;                        (the decoder has already failed)
 *     rc = fksp_finish(&ctx);               (always call: final verdict)
 *
 * Only rc == FKSP_OK means the image is complete and authentic; on any other
 * result the bytes already written (authenticated segments only) must not be
 * activated.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#ifndef FKSP_H
#define FKSP_H

#include <stddef.h>
#include <stdint.h>

#include "mbedtls/gcm.h"
#include "mbedtls/sha256.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Fixed sizes from the spec (Overview, Header, Manifest, Signature, Body). */
#define FKSP_HEADER_LEN 64u
#define FKSP_MANIFEST_LEN 256u
#define FKSP_SIGNATURE_LEN 64u
#define FKSP_PREAMBLE_LEN (FKSP_HEADER_LEN + FKSP_MANIFEST_LEN + FKSP_SIGNATURE_LEN) /* 384 */
#define FKSP_TAG_LEN 16u
#define FKSP_NONCE_LEN 12u
#define FKSP_MIN_SEGMENT_SIZE 256u
#define FKSP_MAX_SEGMENT_SIZE 1048576u
/* Largest segment buffer any valid payload can need: S + 16 with S = 1 MiB. */
#define FKSP_MAX_SEG_BUF_LEN (FKSP_MAX_SEGMENT_SIZE + FKSP_TAG_LEN)
/* Segment buffer needed for a given segment size S. */
#define FKSP_SEG_BUF_LEN(S) ((size_t)(S) + FKSP_TAG_LEN)

#define FKSP_MAX_DEVICE_ID_LEN 64u
#define FKSP_MAX_PRODUCT_LEN 63u
#define FKSP_MAX_VERSION_LEN 32u

/*
 * Result codes. FKSP_OK .. FKSP_ERR_BAD_IMAGE_DIGEST are the spec's verdicts
 * (spec: Decoding on a device); fksp_verdict_name() returns the spec's exact
 * verdict string for them. The remaining codes are conditions of this
 * implementation or of its caller, not properties of the payload.
 */
typedef enum {
    FKSP_OK = 0,                   /* "ok" */
    FKSP_ERR_BAD_HEADER = 1,       /* "bad_header" */
    FKSP_ERR_BAD_SIGNATURE = 2,    /* "bad_signature" */
    FKSP_ERR_WRONG_DEVICE = 3,     /* "wrong_device" */
    FKSP_ERR_WRONG_CHIP = 4,       /* "wrong_chip" */
    FKSP_ERR_DOWNGRADE = 5,        /* "downgrade" */
    FKSP_ERR_BAD_SEGMENT = 6,      /* "bad_segment" */
    FKSP_ERR_TRUNCATED = 7,        /* "truncated" */
    FKSP_ERR_TRAILING_DATA = 8,    /* "trailing_data" */
    FKSP_ERR_BAD_IMAGE_DIGEST = 9, /* "bad_image_digest" */
    /* Not payload verdicts: */
    FKSP_ERR_INTERNAL = 10,         /* "internal_error": mbedTLS failure (e.g. out of heap), HMAC failure */
    FKSP_ERR_WRITE = 11,            /* "write_error": the write callback returned non-zero */
    FKSP_ERR_BUFFER_TOO_SMALL = 12, /* "buffer_too_small": the payload's S + 16 exceeds the segment buffer */
    FKSP_ERR_INVALID_ARGUMENT = 13  /* "invalid_argument": API misuse, unusable manifest key */
} fksp_status;

/* The spec's verdict string for codes 0..9, a descriptive name for the others, "unknown" otherwise. */
const char *fksp_verdict_name(int code);

/*
 * A trusted manifest public key (spec: Header, "manifest key id";
 * spec: Signature). Fill it with fksp_manifest_key_load().
 */
typedef struct {
    uint8_t key_id[32]; /* SHA-256 of the DER SubjectPublicKeyInfo */
    uint8_t point[65];  /* uncompressed P-256 point 0x04 || X || Y */
} fksp_manifest_key;

/*
 * Load a P-256 public key given either as the 65-byte uncompressed point
 * (0x04 || X || Y) or as the 91-byte DER SubjectPublicKeyInfo with the
 * namedCurve prime256v1 parameters (what the service and `openssl pkey
 * -pubout -outform DER` produce). The point is checked to be on the curve.
 * The key id is computed over the canonical 91-byte DER encoding, so both
 * input forms give the same id. Returns FKSP_OK or FKSP_ERR_INVALID_ARGUMENT.
 */
fksp_status fksp_manifest_key_load(fksp_manifest_key *out, const uint8_t *key, size_t key_len);

/*
 * What the device knows about itself. All pointers must stay valid for the
 * lifetime of any fksp_ctx using this device.
 */
typedef struct {
    /*
     * Host build: the 32-byte eFuse secret K_dev. On a chip with an HMAC
     * peripheral the secret never leaves the eFuse: leave this NULL and set
     * efuse_hmac_key instead (see fksp_hmac_efuse() and README.md).
     */
    const uint8_t *efuse_secret;
    int efuse_hmac_key;                        /* ESP-IDF port: the hmac_key_id_t (HMAC_KEY0..5); unused on host */
    const uint8_t *device_id;                  /* the device's id, 1..64 bytes, no terminator needed */
    size_t device_id_len;
    uint16_t chip_id;                          /* esp_image_header_t.chip_id of this chip */
    uint32_t secure_version_floor;             /* anti-rollback floor (eFuse secure_version) */
    const fksp_manifest_key *manifest_keys;    /* trusted manifest keys (any number of versions) */
    size_t manifest_key_count;
} fksp_device;

/*
 * Compute HMAC-SHA256(K_dev, msg) into out[32]; returns 0 on success.
 *
 * This is the only place the device secret is used. The host build computes
 * it in software with mbedtls_md_hmac() from dev->efuse_secret. On an
 * ESP32-S2/S3/C3/C5/C6/H2/P4 build with -DFKSP_HMAC_EFUSE_EXTERNAL and provide
 * this function yourself, calling
 *     esp_hmac_calculate((hmac_key_id_t)dev->efuse_hmac_key, msg, len, out)
 * so that the secret never leaves the eFuse (spec: Payload key).
 */
int fksp_hmac_efuse(const fksp_device *dev, const uint8_t *msg, size_t len, uint8_t out[32]);

/* Authenticated manifest fields, available from fksp_manifest() once the 384-byte preamble was accepted. */
typedef struct {
    uint8_t image_sha256[32];
    uint64_t image_size;
    uint32_t secure_version;
    uint16_t chip_id;
    uint64_t release_time;
    uint32_t segment_size;
    uint32_t segment_count;
    const uint8_t *device_id; /* points into the context; not NUL-terminated */
    size_t device_id_len;
    const uint8_t *product;
    size_t product_len;
    const uint8_t *version;
    size_t version_len;
    uint8_t key_id[32]; /* which manifest key signed */
} fksp_manifest_info;

/*
 * Write callback: called once per authenticated segment, in order, with the
 * segment's plaintext and its offset in the image. Return 0 to continue,
 * anything else to abort decoding with FKSP_ERR_WRITE.
 */
typedef int (*fksp_write_fn)(void *user, uint64_t offset, const uint8_t *data, size_t len);

/*
 * Decoder context. Treat every field as private; it is declared here only so
 * the caller can place the context statically or on the stack (no malloc).
 */
typedef struct {
    const fksp_device *dev;
    uint8_t *seg_buf;
    size_t seg_buf_len;
    int state;           /* internal enum */
    fksp_status result;  /* sticky result once failed or finished */
    size_t pre_fill;     /* bytes of the 384-byte preamble received */
    uint8_t pre[FKSP_PREAMBLE_LEN];
    uint8_t tag[FKSP_TAG_LEN];
    uint32_t seg_index;  /* segment being received */
    size_t seg_ct_len;   /* ciphertext length of the segment being received */
    size_t seg_fill;     /* bytes (ciphertext, then tag) of it received so far */
    uint64_t written;    /* plaintext bytes authenticated and handed to the write callback */
    uint8_t hm_hash[32]; /* SHA-256(Header || Manifest) */
    uint8_t image_digest[32];
    fksp_manifest_info info;
    int gcm_ready;
    int sha_ready;
    mbedtls_gcm_context gcm;
    mbedtls_sha256_context sha;
} fksp_ctx;

/*
 * Start decoding one payload for `dev`. seg_buf (seg_buf_len bytes) is owned
 * by the decoder until fksp_finish()/fksp_abort(); it must hold S + 16 bytes
 * for the payload's segment size S (FKSP_MAX_SEG_BUF_LEN covers every valid
 * payload; FKSP_SEG_BUF_LEN(4096) the default one). A payload needing more
 * fails with FKSP_ERR_BUFFER_TOO_SMALL after its preamble was accepted.
 * Returns FKSP_OK or FKSP_ERR_INVALID_ARGUMENT.
 */
fksp_status fksp_init(fksp_ctx *ctx, const fksp_device *dev, uint8_t *seg_buf, size_t seg_buf_len);

/*
 * Feed the next `len` bytes of the payload. Returns FKSP_OK while no error
 * has been found (more input may be needed), or the verdict as soon as the
 * payload is known to be bad; errors are sticky (later calls return the same
 * code and ignore their input). The decoder releases its crypto state on
 * failure, so no further call is required, but calling fksp_finish() is
 * always safe.
 */
fksp_status fksp_feed(fksp_ctx *ctx, const uint8_t *data, size_t len, fksp_write_fn write_cb, void *user);

/*
 * Declare the end of input and return the final verdict: FKSP_OK only if
 * every segment authenticated, nothing followed the last one and the image
 * SHA-256 matches the manifest (spec: Decoding on a device, steps 5 and 6).
 * Releases and zeroizes all key material and the segment buffer. Idempotent.
 */
fksp_status fksp_finish(fksp_ctx *ctx);

/*
 * Abandon decoding (e.g. the download was cancelled): zeroize and release
 * everything. Idempotent. A later fksp_finish() returns the error already
 * reached, or FKSP_ERR_TRUNCATED if there was none.
 */
void fksp_abort(fksp_ctx *ctx);

/* The authenticated manifest once the preamble was accepted (steps 1-3 passed), else NULL. */
const fksp_manifest_info *fksp_manifest(const fksp_ctx *ctx);

/* Plaintext bytes authenticated and passed to the write callback so far. */
uint64_t fksp_bytes_written(const fksp_ctx *ctx);

/* Number of segments authenticated so far. */
uint32_t fksp_segments_done(const fksp_ctx *ctx);

#ifdef __cplusplus
}
#endif

#endif /* FKSP_H */
