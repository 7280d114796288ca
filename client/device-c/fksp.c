/*
 * fksp.c - streaming decoder for FKSP v1 sealed payloads (mbedTLS).
 *
 * Specification: docs/sealed-payload-v1.md. The decoding order below follows
 * "Decoding on a device" steps 1-6 exactly, so that every input gets the same
 * verdict as the Python reference decoder (client/kmsctl/device/).
 *
 * Builds against mbedTLS 2.28 (Debian, ESP-IDF 4.4) and 3.x (ESP-IDF 5.x).
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#include "fksp.h"

#include <string.h>

#include "mbedtls/ecdsa.h"
#include "mbedtls/ecp.h"
#include "mbedtls/md.h"
#include "mbedtls/platform_util.h"
#include "mbedtls/version.h"

/* SHA-256 API differences between mbedTLS 2.x (…_ret) and 3.x. */
#if MBEDTLS_VERSION_NUMBER >= 0x03000000
#define fksp_sha256_starts(c) mbedtls_sha256_starts((c), 0)
#define fksp_sha256_update(c, d, n) mbedtls_sha256_update((c), (d), (n))
#define fksp_sha256_finish(c, o) mbedtls_sha256_finish((c), (o))
#define fksp_sha256(d, n, o) mbedtls_sha256((d), (n), (o), 0)
#else
#define fksp_sha256_starts(c) mbedtls_sha256_starts_ret((c), 0)
#define fksp_sha256_update(c, d, n) mbedtls_sha256_update_ret((c), (d), (n))
#define fksp_sha256_finish(c, o) mbedtls_sha256_finish_ret((c), (o))
#define fksp_sha256(d, n, o) mbedtls_sha256_ret((d), (n), (o), 0)
#endif

enum {
    ST_PREAMBLE = 0, /* receiving Header || Manifest || Signature (spec steps 1-4) */
    ST_SEGMENTS,     /* receiving segments (spec step 5) */
    ST_DONE,         /* last segment authenticated; any more input is trailing data */
    ST_FAILED,       /* a verdict other than ok was reached; ctx->result holds it */
    ST_FINISHED      /* fksp_finish() returned; ctx->result holds the final verdict */
};

/* spec: Payload key - the fixed label at the start of the HKDF info. */
static const char KEY_LABEL[] = "FKSP/1 payload key"; /* 18 ASCII bytes (without the C terminator) */
#define KEY_LABEL_LEN (sizeof KEY_LABEL - 1u)

/* DER SubjectPublicKeyInfo prefix for an uncompressed P-256 point:
 * SEQUENCE { SEQUENCE { OID id-ecPublicKey, OID prime256v1 }, BIT STRING (0 unused bits) 04||X||Y } */
static const uint8_t P256_SPKI_PREFIX[26] = {0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48,
                                             0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a, 0x86, 0x48,
                                             0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00};
#define P256_POINT_LEN 65u
#define P256_SPKI_LEN (sizeof P256_SPKI_PREFIX + P256_POINT_LEN) /* 91 */

/* ---- small helpers -------------------------------------------------------------------------- */

static uint16_t get_le16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

static uint32_t get_le32(const uint8_t *p)
{
    return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
}

static uint64_t get_le64(const uint8_t *p) { return (uint64_t)get_le32(p) | ((uint64_t)get_le32(p + 4) << 32); }

static int all_zero(const uint8_t *p, size_t n)
{
    uint8_t acc = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        acc |= p[i];
    }
    return acc == 0;
}

static int printable_ascii(const uint8_t *p, size_t n)
{
    size_t i;
    for (i = 0; i < n; i++) {
        if (p[i] < 0x20 || p[i] > 0x7e) {
            return 0;
        }
    }
    return 1;
}

/* Compare two equal-length byte strings without an early exit. */
static int equal_bytes(const uint8_t *a, const uint8_t *b, size_t n)
{
    uint8_t acc = 0;
    size_t i;
    for (i = 0; i < n; i++) {
        acc |= (uint8_t)(a[i] ^ b[i]);
    }
    return acc == 0;
}

static size_t min_size(size_t a, size_t b) { return a < b ? a : b; }

/* ---- public helpers ------------------------------------------------------------------------- */

const char *fksp_verdict_name(int code)
{
    switch (code) {
    case FKSP_OK:
        return "ok";
    case FKSP_ERR_BAD_HEADER:
        return "bad_header";
    case FKSP_ERR_BAD_SIGNATURE:
        return "bad_signature";
    case FKSP_ERR_WRONG_DEVICE:
        return "wrong_device";
    case FKSP_ERR_WRONG_CHIP:
        return "wrong_chip";
    case FKSP_ERR_DOWNGRADE:
        return "downgrade";
    case FKSP_ERR_BAD_SEGMENT:
        return "bad_segment";
    case FKSP_ERR_TRUNCATED:
        return "truncated";
    case FKSP_ERR_TRAILING_DATA:
        return "trailing_data";
    case FKSP_ERR_BAD_IMAGE_DIGEST:
        return "bad_image_digest";
    case FKSP_ERR_INTERNAL:
        return "internal_error";
    case FKSP_ERR_WRITE:
        return "write_error";
    case FKSP_ERR_BUFFER_TOO_SMALL:
        return "buffer_too_small";
    case FKSP_ERR_INVALID_ARGUMENT:
        return "invalid_argument";
    default:
        return "unknown";
    }
}

fksp_status fksp_manifest_key_load(fksp_manifest_key *out, const uint8_t *key, size_t key_len)
{
    uint8_t spki[P256_SPKI_LEN];
    mbedtls_ecp_group grp;
    mbedtls_ecp_point q;
    fksp_status rc = FKSP_ERR_INVALID_ARGUMENT;

    if (out == NULL || key == NULL) {
        return FKSP_ERR_INVALID_ARGUMENT;
    }
    /* Accept the raw uncompressed point or exactly the canonical DER SPKI around one. */
    if (key_len == P256_POINT_LEN && key[0] == 0x04) {
        memcpy(spki, P256_SPKI_PREFIX, sizeof P256_SPKI_PREFIX);
        memcpy(spki + sizeof P256_SPKI_PREFIX, key, P256_POINT_LEN);
    } else if (key_len == P256_SPKI_LEN && memcmp(key, P256_SPKI_PREFIX, sizeof P256_SPKI_PREFIX) == 0 &&
               key[sizeof P256_SPKI_PREFIX] == 0x04) {
        memcpy(spki, key, P256_SPKI_LEN);
    } else {
        return FKSP_ERR_INVALID_ARGUMENT;
    }

    /* Reject points that are not on the curve now rather than at verification time. */
    mbedtls_ecp_group_init(&grp);
    mbedtls_ecp_point_init(&q);
    if (mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_SECP256R1) == 0 &&
        mbedtls_ecp_point_read_binary(&grp, &q, spki + sizeof P256_SPKI_PREFIX, P256_POINT_LEN) == 0 &&
        mbedtls_ecp_check_pubkey(&grp, &q) == 0) {
        /* spec: Header, "manifest key id" = SHA-256 of the DER SubjectPublicKeyInfo. */
        if (fksp_sha256(spki, sizeof spki, out->key_id) == 0) {
            memcpy(out->point, spki + sizeof P256_SPKI_PREFIX, P256_POINT_LEN);
            rc = FKSP_OK;
        }
    }
    mbedtls_ecp_point_free(&q);
    mbedtls_ecp_group_free(&grp);
    return rc;
}

#ifndef FKSP_HMAC_EFUSE_EXTERNAL
/*
 * HMAC-SHA256 keyed with the device's eFuse secret (spec: Payload key).
 *
 * Host build: software HMAC over the secret held in RAM. On real hardware
 * with an HMAC peripheral this function is replaced (compile with
 * -DFKSP_HMAC_EFUSE_EXTERNAL) by one calling
 *     esp_hmac_calculate(HMAC_KEYn, msg, len, out)
 * for the key block burned with purpose HMAC_UP, so K_dev never leaves the
 * eFuse. On ESP32/C2/C61 (no HMAC peripheral) the firmware reads the key block
 * and this software implementation is used unchanged.
 */
int fksp_hmac_efuse(const fksp_device *dev, const uint8_t *msg, size_t len, uint8_t out[32])
{
    const mbedtls_md_info_t *md = mbedtls_md_info_from_type(MBEDTLS_MD_SHA256);
    if (dev == NULL || dev->efuse_secret == NULL || md == NULL) {
        return -1;
    }
    return mbedtls_md_hmac(md, dev->efuse_secret, 32, msg, len, out) == 0 ? 0 : -1;
}
#endif

/* ---- context lifecycle ---------------------------------------------------------------------- */

/* Zeroize and release everything that may hold key material or plaintext. Idempotent. */
static void release(fksp_ctx *ctx)
{
    if (ctx->gcm_ready) {
        mbedtls_gcm_free(&ctx->gcm); /* zeroizes the AES key schedule and GHASH table */
        ctx->gcm_ready = 0;
    }
    if (ctx->sha_ready) {
        mbedtls_sha256_free(&ctx->sha);
        ctx->sha_ready = 0;
    }
    if (ctx->seg_buf != NULL) {
        /* Only the part that can have been used: S + 16 (never more than the buffer). */
        size_t used = 0;
        if (ctx->info.segment_size != 0) { /* nothing was written to it before step 3 passed */
            used = min_size(ctx->seg_buf_len, FKSP_SEG_BUF_LEN(ctx->info.segment_size));
        }
        if (used != 0) {
            mbedtls_platform_zeroize(ctx->seg_buf, used);
        }
    }
    mbedtls_platform_zeroize(ctx->tag, sizeof ctx->tag);
}

static fksp_status fail(fksp_ctx *ctx, fksp_status code)
{
    release(ctx);
    ctx->state = ST_FAILED;
    ctx->result = code;
    return code;
}

fksp_status fksp_init(fksp_ctx *ctx, const fksp_device *dev, uint8_t *seg_buf, size_t seg_buf_len)
{
    if (ctx == NULL) {
        return FKSP_ERR_INVALID_ARGUMENT;
    }
    memset(ctx, 0, sizeof *ctx);
    if (dev == NULL || seg_buf == NULL || seg_buf_len < FKSP_SEG_BUF_LEN(FKSP_MIN_SEGMENT_SIZE) ||
        dev->device_id == NULL || dev->device_id_len == 0 || dev->device_id_len > FKSP_MAX_DEVICE_ID_LEN ||
        (dev->manifest_keys == NULL && dev->manifest_key_count != 0)) {
        ctx->state = ST_FINISHED;
        ctx->result = FKSP_ERR_INVALID_ARGUMENT;
        return FKSP_ERR_INVALID_ARGUMENT;
    }
    ctx->dev = dev;
    ctx->seg_buf = seg_buf;
    ctx->seg_buf_len = seg_buf_len;
    ctx->state = ST_PREAMBLE;
    ctx->result = FKSP_OK;
    return FKSP_OK;
}

void fksp_abort(fksp_ctx *ctx)
{
    if (ctx == NULL || ctx->state == ST_FINISHED) {
        return;
    }
    release(ctx);
    if (ctx->state != ST_FAILED) {
        ctx->result = FKSP_ERR_TRUNCATED; /* the payload ended (for us) before it was complete */
    }
    ctx->state = ST_FINISHED;
}

const fksp_manifest_info *fksp_manifest(const fksp_ctx *ctx)
{
    if (ctx == NULL || ctx->info.segment_count == 0) {
        return NULL;
    }
    return &ctx->info;
}

uint64_t fksp_bytes_written(const fksp_ctx *ctx) { return ctx == NULL ? 0 : ctx->written; }

uint32_t fksp_segments_done(const fksp_ctx *ctx) { return ctx == NULL ? 0 : ctx->seg_index; }

/* ---- step 1: header ------------------------------------------------------------------------- */

/* spec: Header; Decoding on a device, step 1. Every failure here is bad_header. */
static fksp_status check_header(const uint8_t *h)
{
    uint32_t seg_size, seg_count;
    uint64_t image_size;

    if (memcmp(h + 0, "FKSP", 4) != 0) {
        return FKSP_ERR_BAD_HEADER;
    }
    if (h[4] != 1 /* format version */ || h[5] != 1 /* suite */) {
        return FKSP_ERR_BAD_HEADER;
    }
    if (get_le16(h + 6) != FKSP_HEADER_LEN || get_le32(h + 24) != FKSP_MANIFEST_LEN ||
        get_le32(h + 28) != FKSP_SIGNATURE_LEN) {
        return FKSP_ERR_BAD_HEADER;
    }
    seg_size = get_le32(h + 8);
    seg_count = get_le32(h + 12);
    image_size = get_le64(h + 16);
    if (seg_size < FKSP_MIN_SEGMENT_SIZE || seg_size > FKSP_MAX_SEGMENT_SIZE || image_size == 0) {
        return FKSP_ERR_BAD_HEADER;
    }
    /* n = ceil(size / S), computed without overflow (size >= 1). A size whose segment count
     * does not fit the 4-byte field cannot match it, so it is rejected here too. */
    if ((image_size - 1u) / seg_size + 1u != (uint64_t)seg_count) {
        return FKSP_ERR_BAD_HEADER;
    }
    return FKSP_OK;
}

/* ---- step 2: signature ---------------------------------------------------------------------- */

/* spec: Signature; Decoding on a device, step 2. */
static fksp_status check_signature(fksp_ctx *ctx)
{
    const uint8_t *key_id = ctx->pre + 32;
    const uint8_t *sig = ctx->pre + FKSP_HEADER_LEN + FKSP_MANIFEST_LEN;
    const fksp_manifest_key *key = NULL;
    mbedtls_ecp_group grp;
    mbedtls_ecp_point q;
    mbedtls_mpi r, s;
    fksp_status rc = FKSP_ERR_INTERNAL;
    int ret;
    size_t i;

    for (i = 0; i < ctx->dev->manifest_key_count; i++) {
        if (memcmp(ctx->dev->manifest_keys[i].key_id, key_id, 32) == 0) {
            key = &ctx->dev->manifest_keys[i];
            break;
        }
    }
    if (key == NULL) {
        return FKSP_ERR_BAD_SIGNATURE; /* unknown key id */
    }

    mbedtls_ecp_group_init(&grp);
    mbedtls_ecp_point_init(&q);
    mbedtls_mpi_init(&r);
    mbedtls_mpi_init(&s);
    if (mbedtls_ecp_group_load(&grp, MBEDTLS_ECP_DP_SECP256R1) != 0 ||
        mbedtls_ecp_point_read_binary(&grp, &q, key->point, sizeof key->point) != 0 ||
        mbedtls_mpi_read_binary(&r, sig, 32) != 0 /* r, big-endian */ ||
        mbedtls_mpi_read_binary(&s, sig + 32, 32) != 0 /* s, big-endian */) {
        goto out; /* internal: the key was validated when loaded */
    }
    /* mbedtls_ecdsa_verify rejects r or s outside [1, n-1] with VERIFY_FAILED. */
    ret = mbedtls_ecdsa_verify(&grp, ctx->hm_hash, sizeof ctx->hm_hash, &q, &r, &s);
    if (ret == 0) {
        rc = FKSP_OK;
    } else if (ret == MBEDTLS_ERR_ECP_VERIFY_FAILED || ret == MBEDTLS_ERR_ECP_BAD_INPUT_DATA) {
        rc = FKSP_ERR_BAD_SIGNATURE;
    }
out:
    mbedtls_mpi_free(&s);
    mbedtls_mpi_free(&r);
    mbedtls_ecp_point_free(&q);
    mbedtls_ecp_group_free(&grp);
    return rc;
}

/* ---- step 3: manifest ----------------------------------------------------------------------- */

/* spec: Manifest; Decoding on a device, step 3. Fills ctx->info on success. */
static fksp_status check_manifest(fksp_ctx *ctx)
{
    const uint8_t *h = ctx->pre;
    const uint8_t *m = ctx->pre + FKSP_HEADER_LEN;
    const fksp_device *dev = ctx->dev;
    size_t d = m[48], p = m[113], v = m[177];

    /* Structure first: every failure here is bad_header. Lengths are checked before they are
     * used to index the padding checks. */
    if (get_le64(m + 32) != get_le64(h + 16)) { /* image size equals the header's */
        return FKSP_ERR_BAD_HEADER;
    }
    if (!all_zero(m + 46, 2) || !all_zero(m + 218, 38)) { /* reserved */
        return FKSP_ERR_BAD_HEADER;
    }
    if (d < 1 || d > FKSP_MAX_DEVICE_ID_LEN || p < 1 || p > FKSP_MAX_PRODUCT_LEN || v > FKSP_MAX_VERSION_LEN) {
        return FKSP_ERR_BAD_HEADER;
    }
    if (!all_zero(m + 49 + d, FKSP_MAX_DEVICE_ID_LEN - d) || !all_zero(m + 114 + p, FKSP_MAX_PRODUCT_LEN - p) ||
        !all_zero(m + 178 + v, FKSP_MAX_VERSION_LEN - v)) { /* padding after each string */
        return FKSP_ERR_BAD_HEADER;
    }
    if (!printable_ascii(m + 49, d) || !printable_ascii(m + 114, p)) {
        return FKSP_ERR_BAD_HEADER;
    }

    /* Then whether the payload is for this device, this chip, and not a downgrade. */
    if (d != dev->device_id_len || !equal_bytes(m + 49, dev->device_id, d)) {
        return FKSP_ERR_WRONG_DEVICE;
    }
    if (get_le16(m + 44) != dev->chip_id) {
        return FKSP_ERR_WRONG_CHIP;
    }
    if (get_le32(m + 40) < dev->secure_version_floor) {
        return FKSP_ERR_DOWNGRADE;
    }

    memcpy(ctx->info.image_sha256, m, 32);
    ctx->info.image_size = get_le64(m + 32);
    ctx->info.secure_version = get_le32(m + 40);
    ctx->info.chip_id = get_le16(m + 44);
    ctx->info.release_time = get_le64(m + 210);
    ctx->info.segment_size = get_le32(h + 8);
    ctx->info.segment_count = get_le32(h + 12);
    ctx->info.device_id = m + 49;
    ctx->info.device_id_len = d;
    ctx->info.product = m + 114;
    ctx->info.product_len = p;
    ctx->info.version = m + 178;
    ctx->info.version_len = v;
    memcpy(ctx->info.key_id, h + 32, 32);
    return FKSP_OK;
}

/* ---- step 4: payload key -------------------------------------------------------------------- */

/*
 * spec: Payload key. K_payload = HMAC-SHA256(K_dev, info || 0x01), the first
 * HKDF-Expand block, with
 *   info = "FKSP/1 payload key" || 0x00 || d || device id || image SHA-256 || SHA-256(Header || Manifest)
 * The key is loaded into the GCM context and zeroized at once.
 */
static fksp_status derive_key(fksp_ctx *ctx)
{
    /* 18 + 1 + 1 + 64 + 32 + 32 + 1 = 149 bytes at most */
    uint8_t msg[KEY_LABEL_LEN + 1u + 1u + FKSP_MAX_DEVICE_ID_LEN + 32u + 32u + 1u];
    uint8_t key[32];
    size_t n = 0;
    const size_t d = ctx->info.device_id_len; /* <= 64, checked in step 3 */
    fksp_status rc = FKSP_ERR_INTERNAL;

    memcpy(msg + n, KEY_LABEL, KEY_LABEL_LEN);
    n += KEY_LABEL_LEN;
    msg[n++] = 0x00;
    msg[n++] = (uint8_t)d;
    memcpy(msg + n, ctx->info.device_id, d);
    n += d;
    memcpy(msg + n, ctx->info.image_sha256, 32);
    n += 32;
    memcpy(msg + n, ctx->hm_hash, 32);
    n += 32;
    msg[n++] = 0x01; /* HKDF-Expand block counter */

    if (fksp_hmac_efuse(ctx->dev, msg, n, key) == 0) {
        mbedtls_gcm_init(&ctx->gcm);
        ctx->gcm_ready = 1;
        if (mbedtls_gcm_setkey(&ctx->gcm, MBEDTLS_CIPHER_ID_AES, key, 256) == 0) {
            rc = FKSP_OK;
        }
    }
    mbedtls_platform_zeroize(key, sizeof key);
    mbedtls_platform_zeroize(msg, sizeof msg);
    return rc;
}

/* Ciphertext length of segment i (spec: Body): S for all but the last, size - (n-1)*S for the last. */
static size_t segment_ct_len(const fksp_manifest_info *info, uint32_t i)
{
    if (i + 1u < info->segment_count) {
        return info->segment_size;
    }
    return (size_t)(info->image_size - (uint64_t)(info->segment_count - 1u) * info->segment_size);
}

/* The 384-byte preamble is complete: spec steps 2, 3 and 4. */
static fksp_status accept_preamble(fksp_ctx *ctx)
{
    fksp_status rc;
    size_t need;

    /* Step 2. The signed message is Header || Manifest (320 bytes). */
    if (fksp_sha256(ctx->pre, FKSP_HEADER_LEN + FKSP_MANIFEST_LEN, ctx->hm_hash) != 0) {
        return FKSP_ERR_INTERNAL;
    }
    rc = check_signature(ctx);
    if (rc != FKSP_OK) {
        return rc;
    }
    /* Step 3. */
    rc = check_manifest(ctx);
    if (rc != FKSP_OK) {
        return rc;
    }
    /* Not a spec verdict: this device's buffer must hold one segment (ciphertext + 16 bytes of
     * slack, see process_segment). Checked only now so that every spec verdict of steps 1-3 wins. */
    need = FKSP_SEG_BUF_LEN(segment_ct_len(&ctx->info, 0));
    if (need > ctx->seg_buf_len) {
        return FKSP_ERR_BUFFER_TOO_SMALL;
    }
    /* Step 4. */
    rc = derive_key(ctx);
    if (rc != FKSP_OK) {
        return rc;
    }
    mbedtls_sha256_init(&ctx->sha);
    ctx->sha_ready = 1;
    if (fksp_sha256_starts(&ctx->sha) != 0) {
        return FKSP_ERR_INTERNAL;
    }
    ctx->seg_index = 0;
    ctx->seg_ct_len = segment_ct_len(&ctx->info, 0);
    ctx->seg_fill = 0;
    return FKSP_OK;
}

/* ---- step 5: segments ----------------------------------------------------------------------- */

/*
 * One complete segment has been received: ciphertext in seg_buf[16 .. 16+L),
 * tag in ctx->tag. Decrypt-and-verify into seg_buf[0 .. L) (mbedTLS allows
 * the output to trail the input by >= 8 bytes, so no second buffer is
 * needed); only if the tag verifies is the plaintext hashed and written.
 */
static fksp_status process_segment(fksp_ctx *ctx, fksp_write_fn write_cb, void *user)
{
    const uint32_t i = ctx->seg_index;
    const int last = (i + 1u == ctx->info.segment_count);
    const size_t len = ctx->seg_ct_len;
    uint8_t nonce[FKSP_NONCE_LEN] = {0};
    int ret;

    /* nonce(i) = 0x00 x 7 || i (4 bytes big-endian) || last(i) */
    nonce[7] = (uint8_t)(i >> 24);
    nonce[8] = (uint8_t)(i >> 16);
    nonce[9] = (uint8_t)(i >> 8);
    nonce[10] = (uint8_t)i;
    nonce[11] = last ? 0x01 : 0x00;

    ret = mbedtls_gcm_auth_decrypt(&ctx->gcm, len, nonce, sizeof nonce, NULL, 0, ctx->tag, FKSP_TAG_LEN,
                                   ctx->seg_buf + FKSP_TAG_LEN, ctx->seg_buf);
    if (ret == MBEDTLS_ERR_GCM_AUTH_FAILED) {
        return FKSP_ERR_BAD_SEGMENT; /* mbedTLS has already wiped the unauthenticated output */
    }
    if (ret != 0) {
        return FKSP_ERR_INTERNAL;
    }
    if (fksp_sha256_update(&ctx->sha, ctx->seg_buf, len) != 0) {
        return FKSP_ERR_INTERNAL;
    }
    if (write_cb != NULL && write_cb(user, ctx->written, ctx->seg_buf, len) != 0) {
        return FKSP_ERR_WRITE;
    }
    ctx->written += len;
    ctx->seg_index = i + 1u;
    ctx->seg_fill = 0;

    if (last) {
        /* Step 6 needs only the digest; the key is no longer needed. */
        if (fksp_sha256_finish(&ctx->sha, ctx->image_digest) != 0) {
            return FKSP_ERR_INTERNAL;
        }
        release(ctx);
        ctx->state = ST_DONE;
    } else {
        ctx->seg_ct_len = segment_ct_len(&ctx->info, i + 1u);
    }
    return FKSP_OK;
}

/* ---- streaming entry points ----------------------------------------------------------------- */

fksp_status fksp_feed(fksp_ctx *ctx, const uint8_t *data, size_t len, fksp_write_fn write_cb, void *user)
{
    fksp_status rc;

    if (ctx == NULL || (data == NULL && len != 0)) {
        return FKSP_ERR_INVALID_ARGUMENT;
    }
    if (ctx->state == ST_FAILED || ctx->state == ST_FINISHED) {
        return ctx->result;
    }

    while (len > 0) {
        size_t take;

        switch (ctx->state) {
        case ST_PREAMBLE:
            /* Buffer the 384-byte preamble, validating the header as soon as its 64 bytes are in. */
            if (ctx->pre_fill < FKSP_HEADER_LEN) {
                take = min_size(len, FKSP_HEADER_LEN - ctx->pre_fill);
            } else {
                take = min_size(len, FKSP_PREAMBLE_LEN - ctx->pre_fill);
            }
            memcpy(ctx->pre + ctx->pre_fill, data, take);
            ctx->pre_fill += take;
            data += take;
            len -= take;
            if (ctx->pre_fill == FKSP_HEADER_LEN) {
                rc = check_header(ctx->pre); /* step 1 */
                if (rc != FKSP_OK) {
                    return fail(ctx, rc);
                }
            }
            if (ctx->pre_fill == FKSP_PREAMBLE_LEN) {
                rc = accept_preamble(ctx); /* steps 2-4 */
                if (rc != FKSP_OK) {
                    return fail(ctx, rc);
                }
                ctx->state = ST_SEGMENTS;
            }
            break;

        case ST_SEGMENTS:
            /* Ciphertext goes to seg_buf + 16, then the 16-byte tag to ctx->tag. */
            if (ctx->seg_fill < ctx->seg_ct_len) {
                take = min_size(len, ctx->seg_ct_len - ctx->seg_fill);
                memcpy(ctx->seg_buf + FKSP_TAG_LEN + ctx->seg_fill, data, take);
            } else {
                size_t tag_fill = ctx->seg_fill - ctx->seg_ct_len;
                take = min_size(len, FKSP_TAG_LEN - tag_fill);
                memcpy(ctx->tag + tag_fill, data, take);
            }
            ctx->seg_fill += take;
            data += take;
            len -= take;
            if (ctx->seg_fill == ctx->seg_ct_len + FKSP_TAG_LEN) {
                rc = process_segment(ctx, write_cb, user);
                if (rc != FKSP_OK) {
                    return fail(ctx, rc);
                }
            }
            break;

        case ST_DONE:
            /* Step 5: input after the last segment. */
            return fail(ctx, FKSP_ERR_TRAILING_DATA);

        default:
            return fail(ctx, FKSP_ERR_INTERNAL);
        }
    }
    return FKSP_OK;
}

fksp_status fksp_finish(fksp_ctx *ctx)
{
    if (ctx == NULL) {
        return FKSP_ERR_INVALID_ARGUMENT;
    }
    switch (ctx->state) {
    case ST_FINISHED:
        return ctx->result;
    case ST_FAILED:
        break; /* verdict already known */
    case ST_DONE:
        /* Step 6: SHA-256 of all plaintext equals the manifest's image SHA-256. */
        ctx->result =
            equal_bytes(ctx->image_digest, ctx->info.image_sha256, 32) ? FKSP_OK : FKSP_ERR_BAD_IMAGE_DIGEST;
        break;
    default:
        /* Step 5: ran out of input before the last segment was complete (this includes a
         * payload shorter than its 64-byte header or 384-byte preamble). */
        ctx->result = FKSP_ERR_TRUNCATED;
        break;
    }
    release(ctx);
    ctx->state = ST_FINISHED;
    return ctx->result;
}
