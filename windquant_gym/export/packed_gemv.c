/* The decode product of a PackedLinear, y += x @ W^T for a few tokens, straight from its planes.
 *
 * Same arithmetic as PackedLinear's table path (windquant_gym/export/packed_linear.py), fused into
 * one call per module: per unit and plane, a table T[g][v] = sum_j x[g*per + j] * digit_j(v) of the
 * activations' partial sums for every byte value v (phase 1), then per row the sum of T over the
 * row's bytes (phase 2); symbol -> weight is the affine map alpha * (a * s + b), and the unit's INT8
 * outliers (whose positions hold symbol 0 in the planes) are corrected in the same row loop. The
 * codes are read once, as bytes: no float copy of a weight, no index tensor, no per-op overhead.
 *
 * Compiled at first use by windquant_gym/export/native_gemv.py (cc -O3 -march=native -fopenmp),
 * loaded with ctypes: plain C, no Python or torch headers.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TABLE 256 /* entries per group: every byte value (a ternary plane writes only 243 of them) */
#define I64_FIELDS 8
#define I32_FIELDS 9

/* IEEE half -> float, portable (scales are stored fp16; a few per row and unit). */
static inline float half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
    if (exponent == 0) {
        if (mantissa == 0) {
            bits = sign;
        } else { /* subnormal: normalise */
            exponent = 127 - 15 + 1;
            while (!(mantissa & 0x400u)) {
                mantissa <<= 1;
                exponent--;
            }
            bits = sign | (exponent << 23) | ((mantissa & 0x3ffu) << 13);
        }
    } else if (exponent == 31) {
        bits = sign | 0x7f800000u | (mantissa << 13);
    } else {
        bits = sign | ((exponent + 127 - 15) << 23) | (mantissa << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* One unit's plane: where its bytes lie and how a byte holds its digits. */
typedef struct {
    const uint8_t *bytes; /* [out_f, row_bytes] */
    int32_t radix, per_byte, multiplier, row_bytes;
    int64_t table_at; /* offset of its first token's table in the scratch, in floats */
} plane_t;

static void build_table(float *table, const float *x, int64_t width, int32_t radix, int32_t per_byte, int32_t row_bytes)
{
    float digit[8][TABLE];
    for (int32_t j = 0; j < per_byte; j++) {
        int32_t power = 1;
        for (int32_t k = 0; k < j; k++) power *= radix;
        for (int32_t v = 0; v < TABLE; v++) digit[j][v] = (float)((v / power) % radix);
    }
    for (int32_t g = 0; g < row_bytes; g++) {
        float *t = table + (int64_t)g * TABLE;
        for (int32_t v = 0; v < TABLE; v++) t[v] = 0.0f;
        for (int32_t j = 0; j < per_byte; j++) {
            int64_t c = (int64_t)g * per_byte + j;
            if (c >= width) break; /* the row's padding: digit 0, no activation */
            float xc = x[c];
            for (int32_t v = 0; v < TABLE; v++) t[v] += xc * digit[j][v];
        }
    }
}

static inline float gather_sum(const float *table, const uint8_t *row, int32_t row_bytes)
{
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int32_t g = 0;
    for (; g + 4 <= row_bytes; g += 4) {
        s0 += table[(int64_t)(g + 0) * TABLE + row[g + 0]];
        s1 += table[(int64_t)(g + 1) * TABLE + row[g + 1]];
        s2 += table[(int64_t)(g + 2) * TABLE + row[g + 2]];
        s3 += table[(int64_t)(g + 3) * TABLE + row[g + 3]];
    }
    for (; g < row_bytes; g++) s0 += table[(int64_t)g * TABLE + row[g]];
    return (s0 + s1) + (s2 + s3);
}

static inline float byte_dot(const float *x, const uint8_t *row, int32_t n)
{
    float s = 0.0f;
    for (int32_t c = 0; c < n; c++) s += x[c] * (float)row[c];
    return s;
}

static inline int64_t read_index(const void *base, int32_t size, int64_t i)
{
    return size == 1 ? (int64_t)((const uint8_t *)base)[i] : (int64_t)((const int16_t *)base)[i];
}

/* y[m, out_f] += x @ W^T over the module's quantized units.
 *
 * m, x [m, in_f]: the tokens (float32, rows contiguous)
 * per unit u (n_units):
 *   unit_i64 [n, 8]: column, width, scales (address of its fp16 row scales [out_f]), plane 0 and 1
 *     addresses (0: none), outlier counts address ([out_f], uint8 or int16; 0: no outliers), outlier
 *     columns address (inside the unit, uint8 or int16), outlier codes address (int8)
 *   unit_i32 [n, 9]: number of planes, plane 0's radix, per_byte, multiplier, plane 1's the same,
 *     the size in bytes (1 or 2) of an outlier count and of an outlier column
 *   unit_f32 [n, 3]: the affine map (a, b) and the zero point's coefficient c: weight =
 *     alpha * (a * symbol + b - c * z) with z the row's zero point (0 where the unit has none)
 *   outlier_scales [n] addresses of fp16 row scales of the INT8 outliers ([out_f]; 0: none)
 *   zero_points [n] addresses of fp16 row zero points ([out_f]; 0: none, the symmetric grid)
 * y [m, out_f] float32, accumulated into
 * Returns 0; -1 when the scratch could not be allocated, -2 for a plane of more than 8 or fewer
 * than 1 digit per byte (y is then untouched).
 */
int wq_packed_gemv(int64_t m, const float *x, int64_t in_f, int64_t out_f, int64_t n_units, const int64_t *unit_i64,
                   const int32_t *unit_i32, const float *unit_f32, const int64_t *outlier_scales,
                   const int64_t *zero_points, float *y, int32_t threads)
{
    int64_t n_tables = 0, n_offsets = 0;
    plane_t *planes = (plane_t *)malloc(sizeof(plane_t) * (size_t)(2 * n_units + 1));
    int64_t *offsets_at = (int64_t *)malloc(sizeof(int64_t) * (size_t)(n_units + 1));
    if (!planes || !offsets_at) {
        free(planes);
        free(offsets_at);
        return -1;
    }
    for (int64_t u = 0; u < n_units; u++) {
        const int64_t *ui = unit_i64 + I64_FIELDS * u;
        const int32_t *uj = unit_i32 + I32_FIELDS * u;
        for (int32_t p = 0; p < 2; p++) {
            plane_t *pl = &planes[2 * u + p];
            memset(pl, 0, sizeof(*pl));
            if (p >= uj[0]) continue;
            pl->bytes = (const uint8_t *)(uintptr_t)ui[3 + p];
            pl->radix = uj[1 + 3 * p];
            pl->per_byte = uj[2 + 3 * p];
            pl->multiplier = uj[3 + 3 * p];
            pl->row_bytes = (int32_t)((ui[1] + pl->per_byte - 1) / pl->per_byte);
            if (pl->per_byte < 1 || pl->per_byte > 8) {
                free(planes);
                free(offsets_at);
                return -2;
            }
            /* one digit per byte (8 bit): the byte is the symbol, a product needs no table */
            pl->table_at = pl->per_byte == 1 ? -1 : n_tables;
            if (pl->per_byte > 1) n_tables += m * (int64_t)pl->row_bytes * TABLE;
        }
        offsets_at[u] = ui[5] ? n_offsets : -1;
        if (ui[5]) n_offsets += out_f + 1;
    }
    /* scratch: the tables, every unit's activation sum [n_units, m], row offsets of the outliers */
    float *scratch = (float *)malloc(sizeof(float) * (size_t)(n_tables + m * n_units) + sizeof(int64_t) * (size_t)(n_offsets + 1));
    if (!scratch) {
        free(planes);
        free(offsets_at);
        return -1;
    }
    float *xsum = scratch + n_tables;
    int64_t *row_start = (int64_t *)(void *)(xsum + m * n_units + ((m * n_units) & 1)); /* 8-byte aligned */

#pragma omp parallel num_threads(threads)
    {
        /* phase 1: every (unit, plane, token) table, every unit's activation sums, outlier row offsets */
#pragma omp for schedule(dynamic)
        for (int64_t k = 0; k < 3 * n_units * m; k++) {
            int64_t u = k / (3 * m), p = (k / m) % 3, t = k % m;
            const int64_t *ui = unit_i64 + I64_FIELDS * u;
            const float *xu = x + t * in_f + ui[0];
            if (p == 2) { /* once per unit: xsum of every token, and the outliers' row offsets */
                if (t != 0) continue;
                for (int64_t tt = 0; tt < m; tt++) {
                    const float *xt = x + tt * in_f + ui[0];
                    float s = 0.0f;
                    for (int64_t c = 0; c < ui[1]; c++) s += xt[c];
                    xsum[u * m + tt] = s;
                }
                if (offsets_at[u] >= 0) {
                    int64_t *starts = row_start + offsets_at[u], at = 0;
                    const void *counts = (const void *)(uintptr_t)ui[5];
                    for (int64_t r = 0; r < out_f; r++) {
                        starts[r] = at;
                        at += read_index(counts, unit_i32[I32_FIELDS * u + 7], r);
                    }
                    starts[out_f] = at;
                }
                continue;
            }
            const plane_t *pl = &planes[2 * u + p];
            if (!pl->bytes || pl->table_at < 0) continue;
            build_table(scratch + pl->table_at + t * (int64_t)pl->row_bytes * TABLE, xu, ui[1], pl->radix, pl->per_byte,
                        pl->row_bytes);
        }
        /* phase 2: unit after unit (its tables stay in cache), rows split between the threads; the
           static schedule gives a thread the same rows in every unit, so no two write one y row */
        for (int64_t u = 0; u < n_units; u++) {
            const int64_t *ui = unit_i64 + I64_FIELDS * u;
            const int32_t *uj = unit_i32 + I32_FIELDS * u;
            float a = unit_f32[3 * u], b_unit = unit_f32[3 * u + 1], zero_coef = unit_f32[3 * u + 2];
            const uint16_t *zero16 = (const uint16_t *)(uintptr_t)zero_points[u];
            const uint16_t *alpha16 = (const uint16_t *)(uintptr_t)ui[2];
            const int64_t *starts = offsets_at[u] >= 0 ? row_start + offsets_at[u] : NULL;
            const void *cols = (const void *)(uintptr_t)ui[6];
            const int8_t *codes = (const int8_t *)(uintptr_t)ui[7];
            const uint16_t *oscale16 = (const uint16_t *)(uintptr_t)outlier_scales[u];
#pragma omp for schedule(static) nowait
            for (int64_t r = 0; r < out_f; r++) {
                float alpha = half_to_float(alpha16[r]);
                float b = zero16 ? b_unit - zero_coef * half_to_float(zero16[r]) : b_unit;
                for (int64_t t = 0; t < m; t++) {
                    float s = 0.0f;
                    for (int32_t p = 0; p < uj[0]; p++) {
                        const plane_t *pl = &planes[2 * u + p];
                        const uint8_t *row = pl->bytes + r * (int64_t)pl->row_bytes;
                        if (pl->table_at < 0) {
                            s += (float)pl->multiplier * byte_dot(x + t * in_f + ui[0], row, pl->row_bytes);
                        } else {
                            const float *table = scratch + pl->table_at + t * (int64_t)pl->row_bytes * TABLE;
                            s += (float)pl->multiplier * gather_sum(table, row, pl->row_bytes);
                        }
                    }
                    float out = alpha * (a * s + b * xsum[u * m + t]);
                    if (starts) { /* the planes held symbol 0 (weight alpha * b) where an outlier is */
                        const float *xu = x + t * in_f + ui[0];
                        float oscale = half_to_float(oscale16[r]), held = alpha * b;
                        for (int64_t j = starts[r]; j < starts[r + 1]; j++)
                            out += xu[read_index(cols, uj[8], j)] * ((float)codes[j] * oscale - held);
                    }
                    y[t * out_f + r] += out;
                }
            }
        }
    }
    free(scratch);
    free(offsets_at);
    free(planes);
    return 0;
}
