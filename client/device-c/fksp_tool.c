/*
 * fksp_tool - host command-line front end of the FKSP v1 C decoder.
 *
 *   fksp_tool --secret-hex HEX64 --device-id ID --chip-id N --floor N
 *             --manifest-key PUB.der [--manifest-key ...]
 *             --in PAYLOAD --out IMAGE [--chunk N] [--seg-buf N] [--keep-partial]
 *
 * Prints the verdict name (docs/sealed-payload-v1.md, "Decoding on a device")
 * on stdout, a one-line summary on stderr, and exits with the fksp_status code
 * (0 = ok). Command-line and file-opening errors exit with 64 and print
 * nothing on stdout.
 *
 * The plaintext is written to --out one segment at a time, each only after its
 * GCM tag has verified. If the final verdict is not "ok", --out is deleted,
 * unless --keep-partial is given: then it is left holding exactly the
 * segments that authenticated before the failure (all of them for
 * bad_image_digest), which is what a device's inactive OTA slot would hold.
 *
 * SPDX-License-Identifier: Apache-2.0
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "mbedtls/platform_util.h"

#include "fksp.h"

#define EXIT_USAGE 64
#define MAX_KEYS 16
#define MAX_KEY_FILE 4096

static void usage(void)
{
    fputs("usage: fksp_tool --secret-hex HEX64 --device-id ID --chip-id N --floor N\n"
          "                 --manifest-key PUB.der [--manifest-key ...] --in PAYLOAD --out IMAGE\n"
          "                 [--chunk N] [--seg-buf N] [--keep-partial]\n"
          "  --manifest-key  DER SubjectPublicKeyInfo (91 bytes) or raw uncompressed point (65 bytes)\n"
          "  --in            payload file, '-' for stdin\n"
          "  --chunk         feed the decoder N bytes at a time (default 4096)\n"
          "  --seg-buf       segment buffer size in bytes (default 1048592 = 1 MiB + 16)\n"
          "  --keep-partial  on failure keep the authenticated prefix in --out instead of deleting it\n"
          "exit status: the fksp_status code (0 ok, 1 bad_header ... 9 bad_image_digest, 10-13 other),\n"
          "             64 for usage errors\n",
          stderr);
}

static int parse_u64(const char *s, unsigned long long max, unsigned long long *out)
{
    char *end = NULL;
    unsigned long long v;
    if (s == NULL || *s == '\0' || *s == '-') {
        return -1;
    }
    errno = 0;
    v = strtoull(s, &end, 0);
    if (errno != 0 || end == NULL || *end != '\0' || v > max) {
        return -1;
    }
    *out = v;
    return 0;
}

static int hex_nibble(char c)
{
    if (c >= '0' && c <= '9') {
        return c - '0';
    }
    if (c >= 'a' && c <= 'f') {
        return c - 'a' + 10;
    }
    if (c >= 'A' && c <= 'F') {
        return c - 'A' + 10;
    }
    return -1;
}

static int parse_secret(const char *hex, uint8_t out[32])
{
    size_t i;
    if (strlen(hex) != 64) {
        return -1;
    }
    for (i = 0; i < 32; i++) {
        int hi = hex_nibble(hex[2 * i]), lo = hex_nibble(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) {
            return -1;
        }
        out[i] = (uint8_t)((hi << 4) | lo);
    }
    return 0;
}

static int load_key_file(const char *path, fksp_manifest_key *key)
{
    uint8_t buf[MAX_KEY_FILE];
    size_t n;
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        fprintf(stderr, "fksp_tool: %s: %s\n", path, strerror(errno));
        return -1;
    }
    n = fread(buf, 1, sizeof buf, f);
    if (ferror(f) || !feof(f)) {
        fprintf(stderr, "fksp_tool: %s: read error or file too large\n", path);
        fclose(f);
        return -1;
    }
    fclose(f);
    if (fksp_manifest_key_load(key, buf, n) != FKSP_OK) {
        fprintf(stderr, "fksp_tool: %s: not a P-256 public key (DER SubjectPublicKeyInfo or 65-byte point)\n",
                path);
        return -1;
    }
    return 0;
}

typedef struct {
    FILE *out;
} sink;

/* fksp write callback: append one authenticated segment to --out. */
static int write_segment(void *user, uint64_t offset, const uint8_t *data, size_t len)
{
    sink *s = (sink *)user;
    (void)offset; /* segments arrive in order; the file position is the offset */
    return fwrite(data, 1, len, s->out) == len ? 0 : -1;
}

int main(int argc, char **argv)
{
    static fksp_manifest_key keys[MAX_KEYS];
    uint8_t secret[32];
    int have_secret = 0, have_chip = 0, have_floor = 0, keep_partial = 0, read_error = 0;
    const char *device_id = NULL, *in_path = NULL, *out_path = NULL;
    unsigned long long chip_id = 0, floor_v = 0, chunk = 4096, seg_buf_len = FKSP_MAX_SEG_BUF_LEN, v;
    size_t key_count = 0;
    fksp_device dev;
    fksp_ctx ctx;
    uint8_t *seg_buf = NULL, *chunk_buf = NULL;
    FILE *in = NULL;
    sink s = {NULL};
    fksp_status rc;
    int i;

    for (i = 1; i < argc; i++) {
        const char *opt = argv[i];
        const char *val = (i + 1 < argc) ? argv[i + 1] : NULL;
        if (strcmp(opt, "--keep-partial") == 0) {
            keep_partial = 1;
            continue;
        }
        if (strcmp(opt, "--help") == 0 || strcmp(opt, "-h") == 0) {
            usage();
            return 0;
        }
        if (val == NULL) {
            fprintf(stderr, "fksp_tool: %s needs a value\n", opt);
            usage();
            return EXIT_USAGE;
        }
        i++;
        if (strcmp(opt, "--secret-hex") == 0) {
            if (parse_secret(val, secret) != 0) {
                fputs("fksp_tool: --secret-hex needs 64 hex digits\n", stderr);
                return EXIT_USAGE;
            }
            have_secret = 1;
        } else if (strcmp(opt, "--device-id") == 0) {
            device_id = val;
        } else if (strcmp(opt, "--chip-id") == 0) {
            if (parse_u64(val, 0xffffu, &chip_id) != 0) {
                fputs("fksp_tool: --chip-id must be 0..65535\n", stderr);
                return EXIT_USAGE;
            }
            have_chip = 1;
        } else if (strcmp(opt, "--floor") == 0) {
            if (parse_u64(val, 0xffffffffu, &floor_v) != 0) {
                fputs("fksp_tool: --floor must be 0..4294967295\n", stderr);
                return EXIT_USAGE;
            }
            have_floor = 1;
        } else if (strcmp(opt, "--manifest-key") == 0) {
            if (key_count == MAX_KEYS) {
                fputs("fksp_tool: too many --manifest-key\n", stderr);
                return EXIT_USAGE;
            }
            if (load_key_file(val, &keys[key_count]) != 0) {
                return EXIT_USAGE;
            }
            key_count++;
        } else if (strcmp(opt, "--in") == 0) {
            in_path = val;
        } else if (strcmp(opt, "--out") == 0) {
            out_path = val;
        } else if (strcmp(opt, "--chunk") == 0) {
            if (parse_u64(val, 64u * 1024u * 1024u, &v) != 0 || v == 0) {
                fputs("fksp_tool: --chunk must be 1..67108864\n", stderr);
                return EXIT_USAGE;
            }
            chunk = v;
        } else if (strcmp(opt, "--seg-buf") == 0) {
            if (parse_u64(val, FKSP_MAX_SEG_BUF_LEN, &v) != 0 || v < FKSP_SEG_BUF_LEN(FKSP_MIN_SEGMENT_SIZE)) {
                fputs("fksp_tool: --seg-buf must be 272..1048592\n", stderr);
                return EXIT_USAGE;
            }
            seg_buf_len = v;
        } else {
            fprintf(stderr, "fksp_tool: unknown option %s\n", opt);
            usage();
            return EXIT_USAGE;
        }
    }
    if (!have_secret || device_id == NULL || !have_chip || !have_floor || key_count == 0 || in_path == NULL ||
        out_path == NULL) {
        usage();
        return EXIT_USAGE;
    }
    if (strlen(device_id) < 1 || strlen(device_id) > FKSP_MAX_DEVICE_ID_LEN) {
        fputs("fksp_tool: --device-id must be 1..64 bytes\n", stderr);
        return EXIT_USAGE;
    }

    memset(&dev, 0, sizeof dev);
    dev.efuse_secret = secret;
    dev.device_id = (const uint8_t *)device_id;
    dev.device_id_len = strlen(device_id);
    dev.chip_id = (uint16_t)chip_id;
    dev.secure_version_floor = (uint32_t)floor_v;
    dev.manifest_keys = keys;
    dev.manifest_key_count = key_count;

    /* The only two allocations: one segment buffer and one read buffer, both before decoding. */
    seg_buf = malloc((size_t)seg_buf_len);
    chunk_buf = malloc((size_t)chunk);
    if (seg_buf == NULL || chunk_buf == NULL) {
        fputs("fksp_tool: out of memory\n", stderr);
        free(seg_buf);
        free(chunk_buf);
        return EXIT_USAGE;
    }
    in = strcmp(in_path, "-") == 0 ? stdin : fopen(in_path, "rb");
    if (in == NULL) {
        fprintf(stderr, "fksp_tool: %s: %s\n", in_path, strerror(errno));
        free(seg_buf);
        free(chunk_buf);
        return EXIT_USAGE;
    }
    s.out = fopen(out_path, "wb");
    if (s.out == NULL) {
        fprintf(stderr, "fksp_tool: %s: %s\n", out_path, strerror(errno));
        if (in != stdin) {
            fclose(in);
        }
        free(seg_buf);
        free(chunk_buf);
        return EXIT_USAGE;
    }

    rc = fksp_init(&ctx, &dev, seg_buf, (size_t)seg_buf_len);
    while (rc == FKSP_OK) {
        size_t n = fread(chunk_buf, 1, (size_t)chunk, in);
        if (n > 0) {
            rc = fksp_feed(&ctx, chunk_buf, n, write_segment, &s);
        }
        if (n < (size_t)chunk) {
            read_error = ferror(in);
            break; /* end of input (or a read error) */
        }
    }
    if (read_error) {
        fprintf(stderr, "fksp_tool: %s: read error\n", in_path);
        fksp_abort(&ctx);
        rc = FKSP_ERR_INTERNAL;
    } else {
        rc = fksp_finish(&ctx); /* the final verdict; returns the sticky error if feeding failed */
    }
    mbedtls_platform_zeroize(secret, sizeof secret);

    if (fclose(s.out) != 0 && rc == FKSP_OK) {
        rc = FKSP_ERR_WRITE;
    }
    if (rc != FKSP_OK && !keep_partial) {
        remove(out_path);
    }
    if (in != stdin) {
        fclose(in);
    }
    fprintf(stderr, "fksp_tool: %s: %lu segment(s), %llu byte(s) authenticated\n", fksp_verdict_name((int)rc),
            (unsigned long)fksp_segments_done(&ctx), (unsigned long long)fksp_bytes_written(&ctx));
    printf("%s\n", fksp_verdict_name((int)rc));
    free(seg_buf);
    free(chunk_buf);
    return (int)rc;
}
