/* vdisk native core: see copier.h for the contract.
 *
 * Theory of operation
 *   Everything here is a loop around one system call or one memory scan, written so that the Python
 *   reference in vdisk/native.py (PythonCore) can mirror it line for line:
 *
 *   - zero detection reads the cluster in 128-byte blocks (eight 16-byte vectors ORed together) and stops
 *     at the first block with a nonzero bit, so a data cluster usually costs one block;
 *   - positional reads and writes loop on short transfers and EINTR; a read that meets end-of-file fills
 *     the rest of the caller's buffer with zeros (a qcow2 image may end inside its last cluster);
 *   - pwrite_selected turns runs of selected clusters into iovecs that point into the caller's buffer
 *     (adjacent selected clusters become one iovec) and hands up to IOV_MAX of them to one pwritev;
 *   - copy_range lets the kernel copy (copy_file_range: reflink, server-side copy, or an in-kernel copy)
 *     and drops to pread/pwrite through the caller's bounce buffer when the kernel says "not between
 *     these two files" (EXDEV, ENOSYS, EOPNOTSUPP, EINVAL) or copies nothing (end of the source, or a
 *     file system that reports 0 for files it cannot copy).
 *
 * No function allocates; the iovec array lives on the stack (IOV_MAX * 16 bytes = 16 KiB).
 * No function takes or needs the GIL.
 */
#define _GNU_SOURCE
#include "copier.h"

#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

/* Largest transfer handed to one system call; Linux caps a single read/write at 0x7ffff000 anyway, and
 * staying well under SSIZE_MAX keeps the byte counts of one pwritev batch from overflowing. */
#define VDISK_MAX_IO ((size_t)1 << 30)

int vdisk_version(void)
{
    return VDISK_COPIER_VERSION;
}

/* --- zero detection ------------------------------------------------------------------------------- */

static inline uint64_t load64(const uint8_t *p)
{
    uint64_t w;
    memcpy(&w, p, sizeof w); /* unaligned-safe; compiles to one load */
    return w;
}

#if defined(__GNUC__)
/* 16-byte vectors through the compiler's generic vector extension (SSE2 on x86-64, NEON on arm64): no
 * intrinsics, no CPU dispatch, and memcpy keeps the loads unaligned-safe. */
typedef uint64_t vdisk_u64x2 __attribute__((vector_size(16)));

static inline vdisk_u64x2 load128(const uint8_t *p)
{
    vdisk_u64x2 v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* 128 bytes per test, as two independent OR chains. */
static inline int block128_is_zero(const uint8_t *p)
{
    vdisk_u64x2 a = load128(p) | load128(p + 16) | load128(p + 32) | load128(p + 48);
    vdisk_u64x2 b = load128(p + 64) | load128(p + 80) | load128(p + 96) | load128(p + 112);
    a |= b;
    return (a[0] | a[1]) == 0;
}
#else
static inline int block128_is_zero(const uint8_t *p)
{
    uint64_t acc = 0;
    int k;
    for (k = 0; k < 16; k++)
        acc |= load64(p + 8 * k);
    return acc == 0;
}
#endif

static int region_is_zero(const uint8_t *p, size_t len)
{
    size_t i = 0;

    /* One test per 128 bytes: cheap on zero data, an early exit on the first nonzero block (a data
     * cluster usually costs one block). */
    for (; len - i >= 128; i += 128) {
        if (!block128_is_zero(p + i))
            return 0;
    }
    for (; len - i >= 8; i += 8) {
        if (load64(p + i) != 0)
            return 0;
    }
    for (; i < len; i++) {
        if (p[i] != 0)
            return 0;
    }
    return 1;
}

int vdisk_zero_map(const uint8_t *buf, size_t len, size_t cluster_size, uint8_t *out)
{
    size_t n, cluster_index;

    if (cluster_size == 0 || len % cluster_size != 0)
        return -EINVAL;
    n = len / cluster_size;
    for (cluster_index = 0; cluster_index < n; cluster_index++)
        out[cluster_index] = (uint8_t)region_is_zero(buf + cluster_index * cluster_size, cluster_size);
    return 0;
}

/* --- positional I/O ------------------------------------------------------------------------------- */

/* Read up to len bytes; stops early only at end-of-file.  Returns the number of bytes read (the rest of
 * buf is left untouched) or -errno. */
static ssize_t pread_upto(int fd, uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;

    while (done < len) {
        size_t chunk = len - done < VDISK_MAX_IO ? len - done : VDISK_MAX_IO;
        ssize_t r = pread(fd, buf + done, chunk, (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break; /* end of file */
        done += (size_t)r;
    }
    return (ssize_t)done;
}

int vdisk_pread_full(int fd, uint8_t *buf, size_t len, uint64_t offset)
{
    ssize_t got = pread_upto(fd, buf, len, offset);

    if (got < 0)
        return (int)got;
    if ((size_t)got < len)
        memset(buf + got, 0, len - (size_t)got); /* past end-of-file reads as zeros */
    return 0;
}

int vdisk_pwrite_full(int fd, const uint8_t *buf, size_t len, uint64_t offset)
{
    size_t done = 0;

    while (done < len) {
        size_t chunk = len - done < VDISK_MAX_IO ? len - done : VDISK_MAX_IO;
        ssize_t r = pwrite(fd, buf + done, chunk, (off_t)(offset + done));
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO; /* no progress and no error: do not spin */
        done += (size_t)r;
    }
    return 0;
}

/* Write iov[0..count) at offset, looping on short writes.  Consumes (modifies) the iovec array. */
static int pwritev_full(int fd, struct iovec *iov, int count, uint64_t offset)
{
    while (count > 0) {
        ssize_t r = pwritev(fd, iov, count, (off_t)offset);
        size_t left;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            return -EIO;
        offset += (uint64_t)r;
        left = (size_t)r;
        while (count > 0 && left >= iov->iov_len) {
            left -= iov->iov_len;
            iov++;
            count--;
        }
        if (count > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + left;
            iov->iov_len -= left;
        }
    }
    return 0;
}

int vdisk_pwrite_selected(int fd, const uint8_t *buf, size_t cluster_size, const uint8_t *select, size_t n,
                          uint64_t host_offset)
{
    struct iovec iov[IOV_MAX];
    int count = 0;
    size_t batch_bytes = 0;
    size_t cluster_index = 0;
    int rc;

    if (cluster_size == 0)
        return -EINVAL;
    while (cluster_index < n) {
        size_t run_end, run_bytes;

        if (!select[cluster_index]) {
            cluster_index++;
            continue;
        }
        /* A run of adjacent selected clusters is contiguous in buf and in the file: one iovec. */
        run_end = cluster_index + 1;
        while (run_end < n && select[run_end] && (run_end + 1 - cluster_index) * cluster_size <= VDISK_MAX_IO)
            run_end++;
        run_bytes = (run_end - cluster_index) * cluster_size;

        if (count == IOV_MAX || (count > 0 && batch_bytes + run_bytes > VDISK_MAX_IO)) {
            rc = pwritev_full(fd, iov, count, host_offset);
            if (rc)
                return rc;
            host_offset += batch_bytes;
            count = 0;
            batch_bytes = 0;
        }
        iov[count].iov_base = (void *)(buf + cluster_index * cluster_size); /* pwritev does not write to it */
        iov[count].iov_len = run_bytes;
        count++;
        batch_bytes += run_bytes;
        cluster_index = run_end;
    }
    if (count > 0)
        return pwritev_full(fd, iov, count, host_offset);
    return 0;
}

/* --- copy ----------------------------------------------------------------------------------------- */

static int copy_fallback_errno(int err)
{
    return err == EXDEV || err == ENOSYS || err == EOPNOTSUPP || err == ENOTSUP || err == EINVAL;
}

int vdisk_copy_range(int src_fd, uint64_t src_off, int dst_fd, uint64_t dst_off, uint64_t len, uint8_t *bounce,
                     size_t bounce_len)
{
    uint64_t done = 0;
    int use_kernel_copy = 1;
    int at_eof = 0, bounce_zeroed = 0;

    while (done < len && use_kernel_copy) {
        loff_t src_pos = (loff_t)(src_off + done), dst_pos = (loff_t)(dst_off + done);
        size_t chunk = len - done < VDISK_MAX_IO ? (size_t)(len - done) : VDISK_MAX_IO;
        ssize_t r = copy_file_range(src_fd, &src_pos, dst_fd, &dst_pos, chunk, 0);
        if (r > 0) {
            done += (uint64_t)r;
        } else if (r < 0 && errno == EINTR) {
            continue;
        } else if (r < 0 && !copy_fallback_errno(errno)) {
            return -errno;
        } else {
            use_kernel_copy = 0; /* EOF, a file system that copies nothing, or "not between these files" */
        }
    }

    if (done < len && (bounce == NULL || bounce_len == 0))
        return -EINVAL;
    while (done < len) {
        size_t chunk = len - done < bounce_len ? (size_t)(len - done) : bounce_len;
        int rc;

        if (!at_eof) {
            ssize_t got = pread_upto(src_fd, bounce, chunk, src_off + done);
            if (got < 0)
                return (int)got;
            if ((size_t)got < chunk) {
                at_eof = 1; /* everything from here on reads as zeros */
                memset(bounce + got, 0, chunk - (size_t)got);
            }
        } else if (!bounce_zeroed) {
            memset(bounce, 0, bounce_len);
            bounce_zeroed = 1;
        }
        rc = vdisk_pwrite_full(dst_fd, bounce, chunk, dst_off + done);
        if (rc)
            return rc;
        done += chunk;
    }
    return 0;
}
