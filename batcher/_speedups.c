/* batcher._speedups: the WebDataset export's row loop in C.
 *
 * batcher/leanexport.py builds each sample of a WebDataset export (the JSON record of a job's
 * row, its image read from the images folder, three tar members) in Python, at 40-60 us a
 * row; tar(1) archives the same files at a few us each. This module runs that loop over the
 * rows of the export's query for the rows whose values are of the types the job store writes,
 * and hands every other row back to the Python loop's own body (``fallback``), so that a row
 * is written by exactly one of two implementations of one rule, and both write the same
 * bytes (the tests export every kind of row both ways and compare the shards).
 *
 * What it writes, as the Python loop does:
 *   - the record: the fields in the order of ``prefixes`` (``{"id": ``, ``, "state": `` ...),
 *     each value as the json module's encoder writes it (strings escaped as
 *     ``json.encoder.encode_basestring`` escapes them: '"', '\\', \b \f \n \r \t and the other
 *     control characters as \u00XX, lowercase; everything else as it is, in UTF-8);
 *   - the sample's tar members KEY.png (a done job whose file exists), KEY.json and KEY.txt
 *     (the prompt), each a ustar header (mode 0644, uid/gid 0, mtime 0) and the data padded
 *     to 512 bytes, handed to ``put(split, blob)`` in one bytes object;
 *   - the card's counts, into the dicts it is given.
 * Nothing here decides what a value means: where a value needs Python (a params text, a
 * cost, the manifest variables, the text of a second) it calls the function it was given,
 * whose answers it looks up in the dict it was given first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

/* The columns of a row, in the order of leanexport._NAMES, then the rowid. */
enum {
    C_ID, C_STATE, C_MODEL, C_PROMPT, C_SIZE, C_SEED, C_EXTEND, C_PARAMS, C_N, C_OUTPUT,
    C_REQUEST_ID, C_TASK_ID, C_WIDTH, C_HEIGHT, C_SHA256, C_BYTES, C_ATTEMPTS, C_ERROR_CODE,
    C_ERROR_MESSAGE, C_SHORTFALL, C_MICROS, C_CURRENCY, C_ENDPOINT, C_LANE, C_ACTUAL,
    C_INPUT_TOKENS, C_OUTPUT_TOKENS, C_TOTAL_TOKENS, C_LATENCY, C_BILLED, C_THROTTLED,
    C_AMBIGUOUS, C_REGENERATED, C_CREATED, C_STARTED, C_GENERATED, C_FINISHED, C_REVIEW,
    C_REVIEW_NOTE, C_REVIEWED, C_VARS, C_ROWID, N_COLUMNS
};

/* How a field's value is written. */
enum {
    K_ENC,     /* a string, escaped (a row with anything else goes back to Python) */
    K_NUM,     /* null, an int's digits, a float's repr (as the json module writes them) */
    K_BOOL,    /* true / false by the value's truth */
    K_TEXT,    /* null, or a string escaped */
    K_N,       /* n, 1 for 0 */
    K_NEG,     /* the params' negative_prompt as JSON */
    K_WM,      /* the params' watermark as JSON */
    K_FILE,    /* "images/<output>" for a done job, else null */
    K_ONE,     /* 1: the image index of a job of one image */
    K_COST,    /* the cost's JSON, from micros */
    K_ACTUAL,  /* the prompt the image was made from, or null before it was generated */
    K_TIME,    /* a time's ISO 8601 JSON string, or null */
};

typedef struct {
    int kind;
    int col;
} Field;

/* The fields of batcher.records.EXPORT_FIELDS, in order (the manifest variables follow). */
static const Field FIELDS[] = {
    {K_ENC, C_ID}, {K_ENC, C_STATE}, {K_ENC, C_MODEL}, {K_ENC, C_PROMPT}, {K_ENC, C_SIZE},
    {K_NUM, C_SEED}, {K_BOOL, C_EXTEND}, {K_TEXT, C_PARAMS}, {K_N, C_N}, {K_NEG, C_PARAMS},
    {K_WM, C_PARAMS}, {K_FILE, C_OUTPUT}, {K_ONE, 0}, {K_TEXT, C_REQUEST_ID},
    {K_TEXT, C_TASK_ID}, {K_NUM, C_WIDTH}, {K_NUM, C_HEIGHT}, {K_TEXT, C_SHA256},
    {K_NUM, C_BYTES}, {K_NUM, C_ATTEMPTS}, {K_TEXT, C_ERROR_CODE},
    {K_TEXT, C_ERROR_MESSAGE}, {K_TEXT, C_SHORTFALL}, {K_COST, C_MICROS},
    {K_TEXT, C_CURRENCY}, {K_TEXT, C_ENDPOINT}, {K_TEXT, C_LANE}, {K_ACTUAL, C_ACTUAL},
    {K_NUM, C_INPUT_TOKENS}, {K_NUM, C_OUTPUT_TOKENS}, {K_NUM, C_TOTAL_TOKENS},
    {K_NUM, C_LATENCY}, {K_NUM, C_BILLED}, {K_NUM, C_THROTTLED}, {K_NUM, C_AMBIGUOUS},
    {K_NUM, C_REGENERATED}, {K_TIME, C_CREATED}, {K_TIME, C_STARTED}, {K_TIME, C_GENERATED},
    {K_TIME, C_FINISHED}, {K_TEXT, C_REVIEW}, {K_TEXT, C_REVIEW_NOTE}, {K_TIME, C_REVIEWED},
};
#define N_FIELDS ((Py_ssize_t)(sizeof(FIELDS) / sizeof(FIELDS[0])))

#define BLOCK 512
#define FALLBACK 1 /* a row this module does not write: the Python loop does */

typedef struct {
    char *p;
    Py_ssize_t len, cap;
} Buf;

static int
grow(Buf *b, Py_ssize_t extra)
{
    if (b->len + extra <= b->cap) {
        return 0;
    }
    Py_ssize_t cap = b->cap ? b->cap : 8192;
    while (cap < b->len + extra) {
        cap *= 2;
    }
    char *p = PyMem_Realloc(b->p, (size_t)cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static int
add(Buf *b, const char *s, Py_ssize_t n)
{
    if (grow(b, n) < 0) {
        return -1;
    }
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += n;
    return 0;
}

/* A split's samples not handed to its shard yet: the bytes in its open shard when last
 * asked (``base``), those waiting here, and whether its open shard is to be closed first */
typedef struct {
    PyObject *split; /* owned */
    long long base;
    int roll;
    int stale; /* base to be asked again (a row written by Python came between) */
    Buf pending;
} Shard;

#define CHUNK (1 << 20) /* pending bytes of a split handed over at once */

/* What the export hands over: the dicts the counts go into, the caches and the functions
 * behind them, and the Python loop's body for every other row. All borrowed references. */
typedef struct {
    PyObject *prefixes;   /* tuple of bytes: the record's text before each field, then "}" */
    Py_ssize_t n_vars;    /* manifest variables after the built-in fields */
    int dirfd;            /* the images folder, open */
    PyObject *splits;     /* frozenset: the split folders' names */
    PyObject *data;       /* "data": the split of an output in none */
    PyObject *done;       /* "done" */
    PyObject *emulator;   /* the emulator's endpoint */
    PyObject *numbers;    /* dict: split -> samples numbered so far */
    PyObject *states, *per_split, *models, *sizes, *languages, *costs; /* dicts of counts */
    PyObject *params_cache, *params_of;   /* params text -> (negative, watermark) JSON */
    PyObject *cost_cache, *cost_of;       /* micros -> cost JSON */
    PyObject *vars_cache, *vars_of;       /* vars text -> tuple of the variables' JSON */
    PyObject *second_cache, *second_of;   /* whole second -> '"YYYY-MM-DDTHH:MM:SS.' */
    PyObject *writer;     /* batcher.shards.TarShards: add_chunk(split, chunk, roll), current(split) */
    long long limit;      /* its shard size */
    PyObject *fallback;   /* the Python loop's body, called with a rowid, for a row written there */
    Shard *shards;        /* the splits' pending samples */
    int n_shards;
    PyObject *zh, *en, *other; /* the languages' names */
    /* the reusable buffers */
    Buf rec, img;
    /* what was counted */
    long long records, missing, image_bytes;
    PyObject *low, *high; /* owned: the earliest and latest time seen, or NULL */
} Ctx;

/* ---- the record's values ------------------------------------------------------------ */

static int
escaped(Buf *b, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    if (u == NULL) {
        return -1;
    }
    if (grow(b, 6 * n + 2) < 0) {
        return -1;
    }
    static const char hex[] = "0123456789abcdef";
    char *o = b->p + b->len;
    *o++ = '"';
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)u[i];
        if (c >= 0x20 && c != '"' && c != '\\') {
            *o++ = (char)c;
            continue;
        }
        *o++ = '\\';
        switch (c) {
        case '"': *o++ = '"'; break;
        case '\\': *o++ = '\\'; break;
        case '\b': *o++ = 'b'; break;
        case '\f': *o++ = 'f'; break;
        case '\n': *o++ = 'n'; break;
        case '\r': *o++ = 'r'; break;
        case '\t': *o++ = 't'; break;
        default:
            *o++ = 'u';
            *o++ = '0';
            *o++ = '0';
            *o++ = hex[c >> 4];
            *o++ = hex[c & 0xf];
        }
    }
    *o++ = '"';
    b->len = o - b->p;
    return 0;
}

static int
utf8(Buf *b, PyObject *s)
{
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    return u == NULL ? -1 : add(b, u, n);
}

/* ``x``'s decimal digits at ``out`` (room for 21): their count (snprintf's cost, a third of
 * the record's, is its format parsing) */
static int
decimal(char *out, long long x)
{
    char tmp[24];
    int n = 0;
    unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
    do {
        tmp[n++] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    int len = 0;
    if (x < 0) {
        out[len++] = '-';
    }
    while (n) {
        out[len++] = tmp[--n];
    }
    return len;
}

/* ``x`` in octal, ``width`` digits with leading zeros, then a NUL (as "%0*o" and its NUL) */
static void
octal(unsigned char *out, unsigned long long x, int width)
{
    out[width] = 0;
    for (int i = width - 1; i >= 0; i--) {
        out[i] = (unsigned char)('0' + (x & 7));
        x >>= 3;
    }
}

static int
number(Buf *b, PyObject *v)
{
    if (v == Py_None) {
        return add(b, "null", 4);
    }
    if (PyLong_CheckExact(v)) {
        int overflow = 0;
        long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (!overflow) {
            if (x == -1 && PyErr_Occurred()) {
                return -1;
            }
            char digits[24];
            return add(b, digits, decimal(digits, x));
        }
    }
    PyObject *text = PyObject_Str(v); /* a (finite) float's repr, as the json module's */
    if (text == NULL) {
        return -1;
    }
    int r = utf8(b, text);
    Py_DECREF(text);
    return r;
}

/* cache[key], else of(key) (which keeps it in cache as it sees fit): a new reference */
static PyObject *
cached(PyObject *cache, PyObject *of, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(cache, key);
    if (v != NULL) {
        Py_INCREF(v);
        return v;
    }
    if (PyErr_Occurred()) {
        return NULL;
    }
    return PyObject_CallOneArg(of, key);
}

/* A time column's JSON, as leanexport._json_time writes it: 1 for a value of another type */
static int
when(Ctx *c, Buf *b, PyObject *v)
{
    if (v == Py_None) {
        return add(b, "null", 4);
    }
    long long second;
    long long micros = 0;
    if (PyFloat_CheckExact(v)) {
        double stamp = PyFloat_AS_DOUBLE(v);
        if (!isfinite(stamp) || fabs(stamp) > 9e15) {
            return FALLBACK;
        }
        double whole = floor(stamp);
        second = (long long)whole;
        micros = (long long)nearbyint((stamp - whole) * 1e6); /* round half to even */
        if (micros >= 1000000) {
            second += 1;
            micros -= 1000000;
        }
    }
    else if (PyLong_CheckExact(v)) {
        int overflow = 0;
        second = PyLong_AsLongLongAndOverflow(v, &overflow);
        if (overflow || (second == -1 && PyErr_Occurred())) {
            PyErr_Clear();
            return FALLBACK;
        }
    }
    else {
        return FALLBACK;
    }
    PyObject *key = PyLong_FromLongLong(second);
    if (key == NULL) {
        return -1;
    }
    PyObject *head = cached(c->second_cache, c->second_of, key);
    Py_DECREF(key);
    if (head == NULL) {
        return -1;
    }
    int r = PyUnicode_Check(head) ? utf8(b, head) : (PyErr_SetString(PyExc_TypeError, "second_of"), -1);
    Py_DECREF(head);
    if (r < 0) {
        return -1;
    }
    int ms = (int)(micros / 1000);
    char tail[5] = {(char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10),
                    'Z', '"'};
    return add(b, tail, 5);
}

static int
text_value(Buf *b, PyObject *v)
{
    if (v == Py_None) {
        return add(b, "null", 4);
    }
    if (PyUnicode_CheckExact(v)) {
        return escaped(b, v);
    }
    return FALLBACK;
}

/* A str of JSON from a cache (params, cost, variables) written as it is */
static int
json_text(Buf *b, PyObject *v)
{
    if (!PyUnicode_Check(v)) {
        PyErr_SetString(PyExc_TypeError, "a cached JSON value is not a str");
        return -1;
    }
    return utf8(b, v);
}

/* The record of ``row`` into c->rec: 0, FALLBACK or -1 */
static int
record(Ctx *c, PyObject **col, int done)
{
    Buf *b = &c->rec;
    b->len = 0;
    PyObject *params = NULL, *vars = NULL;
    int r = 0;
    for (Py_ssize_t i = 0; i < N_FIELDS + c->n_vars && r == 0; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(c->prefixes, i);
        r = add(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix));
        if (r != 0) {
            break;
        }
        if (i >= N_FIELDS) { /* a manifest variable */
            if (vars == NULL) {
                vars = cached(c->vars_cache, c->vars_of, col[C_VARS]);
                if (vars == NULL) {
                    r = -1;
                    break;
                }
                if (!PyTuple_Check(vars) || PyTuple_GET_SIZE(vars) != c->n_vars) {
                    PyErr_SetString(PyExc_TypeError, "vars_of gave the wrong values");
                    r = -1;
                    break;
                }
            }
            r = json_text(b, PyTuple_GET_ITEM(vars, i - N_FIELDS));
            continue;
        }
        const Field f = FIELDS[i];
        PyObject *v = col[f.col];
        switch (f.kind) {
        case K_ENC:
            r = PyUnicode_CheckExact(v) ? escaped(b, v) : FALLBACK;
            break;
        case K_NUM:
            r = number(b, v);
            break;
        case K_BOOL: {
            int t = PyObject_IsTrue(v);
            r = t < 0 ? -1 : t ? add(b, "true", 4) : add(b, "false", 5);
            break;
        }
        case K_TEXT:
            r = text_value(b, v);
            break;
        case K_N: {
            int t = PyObject_IsTrue(v);
            r = t < 0 ? -1 : t ? number(b, v) : add(b, "1", 1);
            break;
        }
        case K_NEG:
        case K_WM:
            if (v == Py_None) {
                r = add(b, "null", 4);
                break;
            }
            if (!PyUnicode_CheckExact(v)) {
                r = FALLBACK;
                break;
            }
            if (params == NULL) {
                params = cached(c->params_cache, c->params_of, v);
                if (params == NULL) {
                    r = -1;
                    break;
                }
                if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != 2) {
                    PyErr_SetString(PyExc_TypeError, "params_of gave the wrong values");
                    r = -1;
                    break;
                }
            }
            r = json_text(b, PyTuple_GET_ITEM(params, f.kind == K_NEG ? 0 : 1));
            break;
        case K_FILE:
            if (!done) {
                r = add(b, "null", 4);
            }
            else if (!PyUnicode_CheckExact(v)) {
                r = FALLBACK;
            }
            else {
                PyObject *path = PyUnicode_FromFormat("images/%U", v);
                r = path == NULL ? -1 : escaped(b, path);
                Py_XDECREF(path);
            }
            break;
        case K_ONE:
            r = add(b, "1", 1);
            break;
        case K_COST: {
            PyObject *cost = cached(c->cost_cache, c->cost_of, v);
            r = cost == NULL ? -1 : json_text(b, cost);
            Py_XDECREF(cost);
            break;
        }
        case K_ACTUAL:
            if (col[C_GENERATED] == Py_None && col[C_REQUEST_ID] == Py_None) {
                r = add(b, "null", 4);
            }
            else {
                int t = PyObject_IsTrue(v);
                PyObject *said = t < 0 ? NULL : t ? v : col[C_PROMPT];
                r = said == NULL ? -1 : PyUnicode_CheckExact(said) ? escaped(b, said) : FALLBACK;
            }
            break;
        case K_TIME:
            r = when(c, b, v);
            break;
        }
    }
    Py_XDECREF(params);
    Py_XDECREF(vars);
    if (r == 0) {
        r = add(b, "}", 1);
    }
    return r;
}

/* ---- the image -------------------------------------------------------------------- */

/* The file at ``output`` (relative to the images folder) into c->img: 0 read, 1 missing
 * (no such file), -1 an error (an OSError raised). As batcher.shardexport.read_file: one
 * read of one byte more than the recorded size, more only when the file grew. */
static int
read_image(Ctx *c, PyObject *output, PyObject *nbytes)
{
    const char *path = PyUnicode_AsUTF8(output);
    if (path == NULL) {
        return -1;
    }
    long long size = 0;
    if (nbytes != Py_None) {
        size = PyLong_AsLongLong(nbytes);
        if (size == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (size < 0) {
            size = 0;
        }
    }
    int fd;
    Py_BEGIN_ALLOW_THREADS
    fd = openat(c->dirfd, path, O_RDONLY | O_CLOEXEC);
    Py_END_ALLOW_THREADS
    if (fd < 0) {
        if (errno == ENOENT) {
            return 1;
        }
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, output);
        return -1;
    }
    Buf *b = &c->img;
    b->len = 0;
    Py_ssize_t want = (Py_ssize_t)size + 1;
    for (;;) {
        if (grow(b, want) < 0) {
            close(fd);
            return -1;
        }
        ssize_t got;
        Py_BEGIN_ALLOW_THREADS
        got = read(fd, b->p + b->len, (size_t)want);
        Py_END_ALLOW_THREADS
        if (got < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    close(fd);
                    return -1;
                }
                continue;
            }
            PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, output);
            close(fd);
            return -1;
        }
        b->len += got;
        if (got < want) {
            break;
        }
        want = want > (1 << 20) ? want : (1 << 20);
    }
    close(fd);
    return 0;
}

/* ---- the tar members -------------------------------------------------------------- */

/* A member's header, data and padding at the end of ``b``, which has room for them */
static void
member(Buf *b, const char *key, Py_ssize_t klen, const char *ext, const char *data,
       Py_ssize_t size)
{
    unsigned char *h = (unsigned char *)b->p + b->len;
    memset(h, 0, BLOCK);
    size_t elen = strlen(ext);
    memcpy(h, key, (size_t)klen);
    memcpy(h + klen, ext, elen);
    memcpy(h + 100, "0000644", 8);
    memcpy(h + 108, "0000000", 8);
    memcpy(h + 116, "0000000", 8);
    octal(h + 124, (unsigned long long)size, 11);
    memcpy(h + 136, "00000000000", 12);
    memset(h + 148, ' ', 8);
    h[156] = '0';
    memcpy(h + 257, "ustar", 6);
    h[263] = '0';
    h[264] = '0';
    unsigned long sum = 0;
    for (int i = 0; i < BLOCK; i++) {
        sum += h[i];
    }
    octal(h + 148, sum, 6);
    h[155] = ' ';
    b->len += BLOCK;
    memcpy(b->p + b->len, data, (size_t)size);
    b->len += size;
    Py_ssize_t pad = (-size) & (BLOCK - 1);
    memset(b->p + b->len, 0, (size_t)pad);
    b->len += pad;
}

/* ---- the card's counts ------------------------------------------------------------ */

static int
count(PyObject *dict, PyObject *key)
{
    PyObject *v = PyDict_GetItemWithError(dict, key);
    long long x = 0;
    if (v != NULL) {
        x = PyLong_AsLongLong(v);
        if (x == -1 && PyErr_Occurred()) {
            return -1;
        }
    }
    else if (PyErr_Occurred()) {
        return -1;
    }
    PyObject *nv = PyLong_FromLongLong(x + 1);
    if (nv == NULL) {
        return -1;
    }
    int r = PyDict_SetItem(dict, key, nv);
    Py_DECREF(nv);
    return r;
}

/* batcher.card.prompt_language: zh with a CJK ideograph (U+3400-4DBF, U+4E00-9FFF), else en
 * with a Latin letter, else other */
static PyObject *
language(Ctx *c, PyObject *prompt)
{
    int kind = PyUnicode_KIND(prompt);
    const void *data = PyUnicode_DATA(prompt);
    Py_ssize_t n = PyUnicode_GET_LENGTH(prompt);
    int latin = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_UCS4 ch = PyUnicode_READ(kind, data, i);
        if ((ch >= 0x3400 && ch <= 0x4dbf) || (ch >= 0x4e00 && ch <= 0x9fff)) {
            return c->zh;
        }
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z')) {
            latin = 1;
            if (kind == PyUnicode_1BYTE_KIND) {
                return c->en; /* no ideograph can follow in a string of Latin-1 */
            }
        }
    }
    return latin ? c->en : c->other;
}

static int
stamp(Ctx *c, PyObject *v)
{
    if (v == Py_None) {
        return 0;
    }
    if (c->low == NULL) {
        Py_INCREF(v);
        Py_INCREF(v);
        c->low = c->high = v;
        return 0;
    }
    int lt = PyObject_RichCompareBool(v, c->low, Py_LT);
    if (lt < 0) {
        return -1;
    }
    if (lt) {
        Py_INCREF(v);
        Py_SETREF(c->low, v);
    }
    int gt = PyObject_RichCompareBool(v, c->high, Py_GT);
    if (gt < 0) {
        return -1;
    }
    if (gt) {
        Py_INCREF(v);
        Py_SETREF(c->high, v);
    }
    return 0;
}

/* ---- the shards ------------------------------------------------------------------- */

/* Hand ``sh``'s pending samples to the writer's shard of its split */
static int
hand_over(Ctx *c, Shard *sh)
{
    if (sh->pending.len == 0) {
        return 0;
    }
    /* a view of the buffer, not a copy (the writer keeps nothing of it): a new bytes object
     * of a megabyte a time was a fresh mapping of memory, its pages faulted in each time */
    PyObject *chunk = PyMemoryView_FromMemory(sh->pending.p, sh->pending.len, PyBUF_READ);
    if (chunk == NULL) {
        return -1;
    }
    PyObject *res = PyObject_CallMethod(c->writer, "add_chunk", "OOO", sh->split, chunk,
                                        sh->roll ? Py_True : Py_False);
    Py_DECREF(chunk);
    if (res == NULL) {
        return -1;
    }
    Py_DECREF(res);
    sh->base += sh->pending.len;
    sh->pending.len = 0;
    sh->roll = 0;
    return 0;
}

/* Every split's pending samples handed over: before a row Python writes, and at the end */
static int
hand_over_all(Ctx *c, int stale)
{
    for (int i = 0; i < c->n_shards; i++) {
        if (hand_over(c, &c->shards[i]) < 0) {
            return -1;
        }
        c->shards[i].stale = stale;
    }
    return 0;
}

/* ``split``'s pending samples, with room for ``size`` more bytes of a sample, the shard
 * rolled over first as TarShards._shard_for rolls it: when the open shard holds something
 * and would pass the shard size with this sample */
static Shard *
shard_for(Ctx *c, PyObject *split, Py_ssize_t size)
{
    Shard *sh = NULL;
    for (int i = 0; i < c->n_shards && sh == NULL; i++) {
        PyObject *known = c->shards[i].split;
        if (known == split || PyUnicode_Compare(known, split) == 0) {
            sh = &c->shards[i];
        }
    }
    if (sh == NULL) {
        Shard *more = PyMem_Realloc(c->shards, sizeof(Shard) * (size_t)(c->n_shards + 1));
        if (more == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        c->shards = more;
        sh = &c->shards[c->n_shards++];
        memset(sh, 0, sizeof *sh);
        Py_INCREF(split);
        sh->split = split;
        sh->stale = 1;
    }
    if (sh->stale) {
        PyObject *got = PyObject_CallMethod(c->writer, "current", "O", sh->split);
        if (got == NULL) {
            return NULL;
        }
        sh->base = PyLong_AsLongLong(got);
        Py_DECREF(got);
        if (sh->base == -1 && PyErr_Occurred()) {
            return NULL;
        }
        sh->stale = 0;
    }
    long long held = sh->base + sh->pending.len;
    if (held > 0 && held + size > c->limit) {
        if (hand_over(c, sh) < 0) {
            return NULL;
        }
        sh->roll = 1;
        sh->base = 0;
    }
    if (grow(&sh->pending, size) < 0) {
        return NULL;
    }
    return sh;
}

static void
free_shards(Ctx *c)
{
    for (int i = 0; i < c->n_shards; i++) {
        Py_DECREF(c->shards[i].split);
        PyMem_Free(c->shards[i].pending.p);
    }
    PyMem_Free(c->shards);
}

/* ---- one row ---------------------------------------------------------------------- */

static int
is_key_char(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch == '-';
}

/* Whether a row's numbers are of the types the job store writes (a hand-edited table's row
 * is written by Python, as leanexport._PLAIN says) */
static int
plain(PyObject **col)
{
    static const int ints[] = {C_WIDTH, C_HEIGHT, C_BYTES, C_ATTEMPTS, C_INPUT_TOKENS,
                               C_OUTPUT_TOKENS, C_TOTAL_TOKENS, C_BILLED, C_THROTTLED,
                               C_AMBIGUOUS, C_REGENERATED};
    if (!PyLong_CheckExact(col[C_SEED]) || !PyLong_CheckExact(col[C_N])) {
        return 0;
    }
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        PyObject *v = col[ints[i]];
        if (v != Py_None && !PyLong_CheckExact(v)) {
            return 0;
        }
    }
    PyObject *latency = col[C_LATENCY];
    return latency == Py_None ||
           (PyFloat_CheckExact(latency) && isfinite(PyFloat_AS_DOUBLE(latency)));
}

static int
row(Ctx *c, PyObject *tuple)
{
    if (!PyTuple_CheckExact(tuple) || PyTuple_GET_SIZE(tuple) != N_COLUMNS) {
        PyErr_SetString(PyExc_ValueError, "write_rows: a row of other columns");
        return -1;
    }
    PyObject **col = ((PyTupleObject *)tuple)->ob_item;
    PyObject *job_id = col[C_ID], *st = col[C_STATE], *output = col[C_OUTPUT];
    PyObject *prompt = col[C_PROMPT], *n_obj = col[C_N];
    if (!PyUnicode_CheckExact(job_id) || !PyUnicode_IS_ASCII(job_id) ||
        !PyUnicode_CheckExact(st) || !PyUnicode_CheckExact(output) ||
        !PyUnicode_CheckExact(prompt) || !plain(col)) {
        return FALLBACK;
    }
    int done = PyUnicode_Compare(st, c->done) == 0;
    long long n = PyLong_AsLongLong(n_obj);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (n > 1 && done) {
        return FALLBACK; /* a row per image: the general path's records */
    }
    if (n == 0) {
        n = 1;
    }
    int r = record(c, col, done);
    if (r != 0) {
        return r;
    }

    /* the split: the output's first folder when it is one of the split folders */
    PyObject *split = c->data;
    Py_ssize_t slash = PyUnicode_FindChar(output, '/', 0, PyUnicode_GET_LENGTH(output), 1);
    if (slash == -2) {
        return -1;
    }
    PyObject *head = NULL;
    if (slash >= 0) {
        head = PyUnicode_Substring(output, 0, slash);
        if (head == NULL) {
            return -1;
        }
        int in = PySet_Contains(c->splits, head);
        if (in < 0) {
            Py_DECREF(head);
            return -1;
        }
        if (in) {
            split = head;
        }
    }
    int missing = 1;
    if (done) {
        missing = read_image(c, output, col[C_BYTES]);
        if (missing < 0) {
            goto fail;
        }
        if (missing) {
            c->missing += 1;
        }
        else {
            c->image_bytes += c->img.len;
        }
        if (count(c->sizes, col[C_SIZE]) < 0) {
            goto fail;
        }
    }
    /* the sample's number within its split, and its key */
    PyObject *got = PyDict_GetItemWithError(c->numbers, split);
    long long number = 0;
    if (got != NULL) {
        number = PyLong_AsLongLong(got);
        if (number == -1 && PyErr_Occurred()) {
            goto fail;
        }
    }
    else if (PyErr_Occurred()) {
        goto fail;
    }
    PyObject *next = PyLong_FromLongLong(number + 1);
    if (next == NULL || PyDict_SetItem(c->numbers, split, next) < 0) {
        Py_XDECREF(next);
        goto fail;
    }
    Py_DECREF(next);
    char key[128];
    int klen = decimal(key, number); /* as "%06d": at least six digits */
    if (klen < 6) {
        memmove(key + 6 - klen, key, (size_t)klen);
        memset(key, '0', (size_t)(6 - klen));
        klen = 6;
    }
    key[klen++] = '_';
    Py_ssize_t idlen;
    const char *id = PyUnicode_AsUTF8AndSize(job_id, &idlen);
    if (id == NULL) {
        goto fail;
    }
    char name[96];
    Py_ssize_t nlen = 0;
    for (Py_ssize_t i = 0; i < idlen && nlen < 80; i++) {
        name[nlen++] = is_key_char((unsigned char)id[i]) ? id[i] : '_';
    }
    if (n != 1 && nlen < 80) { /* a job of several images not done yet: "<id>-1" */
        name[nlen++] = '-';
        if (nlen < 80) {
            name[nlen++] = '1';
        }
    }
    if (klen + nlen > 95) {
        PyErr_SetString(PyExc_ValueError, "a sample key longer than a tar name");
        goto fail;
    }
    memcpy(key + klen, name, (size_t)nlen);
    klen += (int)nlen;

    /* the members, after the split's pending samples */
    Py_ssize_t plen;
    const char *ptext = PyUnicode_AsUTF8AndSize(prompt, &plen);
    if (ptext == NULL) {
        goto fail;
    }
    Py_ssize_t size = 2 * BLOCK + c->rec.len + ((-c->rec.len) & (BLOCK - 1)) + plen +
                      ((-plen) & (BLOCK - 1));
    if (!missing) {
        size += BLOCK + c->img.len + ((-c->img.len) & (BLOCK - 1));
    }
    Shard *sh = shard_for(c, split, size);
    if (sh == NULL) {
        goto fail;
    }
    Buf *o = &sh->pending;
    if (!missing) {
        member(o, key, klen, ".png", c->img.p, c->img.len);
    }
    member(o, key, klen, ".json", c->rec.p, c->rec.len);
    member(o, key, klen, ".txt", ptext, plen);
    if (o->len >= CHUNK && hand_over(c, sh) < 0) {
        goto fail;
    }

    /* the card's counts, as batcher.card.CardFacts.add counts a job */
    c->records += 1;
    if (count(c->states, st) < 0 || count(c->per_split, split) < 0 ||
        count(c->models, col[C_MODEL]) < 0 || count(c->languages, language(c, prompt)) < 0) {
        goto fail;
    }
    int cur = PyObject_IsTrue(col[C_CURRENCY]);
    if (cur < 0) {
        goto fail;
    }
    if (cur) {
        int emu = PyObject_RichCompareBool(col[C_ENDPOINT], c->emulator, Py_EQ);
        if (emu < 0) {
            goto fail;
        }
        PyObject *k = PyTuple_Pack(3, col[C_CURRENCY], col[C_MICROS], emu ? Py_True : Py_False);
        if (k == NULL) {
            goto fail;
        }
        int cr = count(c->costs, k);
        Py_DECREF(k);
        if (cr < 0) {
            goto fail;
        }
    }
    if (stamp(c, col[C_CREATED]) < 0 || stamp(c, col[C_FINISHED]) < 0) {
        goto fail;
    }
    Py_XDECREF(head);
    return 0;
fail:
    Py_XDECREF(head);
    return -1;
}

/* ---- the module --------------------------------------------------------------------- */

static const char write_rows_doc[] =
    "write_rows(rows, prefixes, n_vars, dirfd, splits, done, emulator, numbers, counts,\n"
    "           caches, writer, shard_size, fallback, languages)\n"
    "    -> (records, missing, image_bytes, low, high)\n"
    "\n"
    "Write the WebDataset samples of ``rows`` (the job table's columns, then the rowid) to\n"
    "``writer`` (a TarShards), calling ``fallback(rowid)`` for each row this module does not\n"
    "write. ``counts``: the dicts (states, splits, models, sizes, languages, costs);\n"
    "``caches``: (params cache, params_of, cost cache, cost_of, vars cache, vars_of, second\n"
    "cache, second_of); ``languages``: the names (zh, en, other). Returns the counts of the\n"
    "rows written here and the earliest and latest of their created and finished times\n"
    "(None when none).";

static PyObject *
write_rows(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *rows, *counts, *caches, *langs;
    Ctx c;
    memset(&c, 0, sizeof c);
    if (!PyArg_ParseTuple(args, "OO!niO!UUO!O!O!OLOO!:write_rows", &rows, &PyTuple_Type,
                          &c.prefixes, &c.n_vars, &c.dirfd, &PyFrozenSet_Type, &c.splits,
                          &c.done, &c.emulator, &PyDict_Type, &c.numbers, &PyTuple_Type,
                          &counts, &PyTuple_Type, &caches, &c.writer, &c.limit, &c.fallback,
                          &PyTuple_Type, &langs)) {
        return NULL;
    }
    if (PyTuple_GET_SIZE(c.prefixes) != N_FIELDS + c.n_vars + 1 ||
        PyTuple_GET_SIZE(counts) != 6 || PyTuple_GET_SIZE(caches) != 8 ||
        PyTuple_GET_SIZE(langs) != 3) {
        PyErr_SetString(PyExc_ValueError, "write_rows: the fields or tuples do not match");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(c.prefixes); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(c.prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a prefix is not bytes");
            return NULL;
        }
    }
    PyObject **dicts[] = {&c.states, &c.per_split, &c.models, &c.sizes, &c.languages, &c.costs};
    for (int i = 0; i < 6; i++) {
        *dicts[i] = PyTuple_GET_ITEM(counts, i);
        if (!PyDict_Check(*dicts[i])) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a count is not a dict");
            return NULL;
        }
    }
    PyObject **cache[] = {&c.params_cache, &c.params_of, &c.cost_cache, &c.cost_of,
                          &c.vars_cache, &c.vars_of, &c.second_cache, &c.second_of};
    for (int i = 0; i < 8; i++) {
        *cache[i] = PyTuple_GET_ITEM(caches, i);
        if (i % 2 == 0 && !PyDict_Check(*cache[i])) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a cache is not a dict");
            return NULL;
        }
    }
    c.zh = PyTuple_GET_ITEM(langs, 0);
    c.en = PyTuple_GET_ITEM(langs, 1);
    c.other = PyTuple_GET_ITEM(langs, 2);
    c.data = PyUnicode_InternFromString("data");
    if (c.data == NULL) {
        return NULL;
    }
    PyObject *it = PyObject_GetIter(rows);
    PyObject *result = NULL;
    if (it == NULL) {
        goto done;
    }
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        int r = row(&c, item);
        if (r == FALLBACK) { /* written by Python, after the samples before it */
            r = hand_over_all(&c, 1);
            if (r == 0) {
                PyObject *rowid = ((PyTupleObject *)item)->ob_item[C_ROWID];
                PyObject *res = PyObject_CallOneArg(c.fallback, rowid);
                r = res == NULL ? -1 : 0;
                Py_XDECREF(res);
            }
        }
        Py_DECREF(item);
        if (r < 0) {
            goto done;
        }
    }
    if (PyErr_Occurred() || hand_over_all(&c, 1) < 0) {
        goto done;
    }
    result = Py_BuildValue("LLLOO", c.records, c.missing, c.image_bytes,
                           c.low ? c.low : Py_None, c.high ? c.high : Py_None);
done:
    Py_XDECREF(it);
    Py_XDECREF(c.low);
    Py_XDECREF(c.high);
    Py_DECREF(c.data);
    free_shards(&c);
    PyMem_Free(c.rec.p);
    PyMem_Free(c.img.p);
    return result;
}

static PyMethodDef methods[] = {
    {"write_rows", write_rows, METH_VARARGS, write_rows_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "batcher._speedups",
    "The WebDataset export's row loop in C (batcher.leanexport uses it where it was built).",
    -1,
    methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    return PyModule_Create(&module);
}
