/* batcher._speedups: the WebDataset export's row loop in C.
 *
 * batcher/leanexport.py builds each sample of a WebDataset export (the JSON record of a job's
 * row, its image read from the images folder, three tar members) in Python, at 30-60 us a
 * row, of which reading the row through the sqlite3 module (a Python object per column) is
 * ten; tar(1) archives the same files at a few us each. This module reads the rows of the
 * export's query itself, through SQLite's C interface on a read-only connection of its own,
 * writes the samples of the rows whose values are of the types the job store writes, and
 * hands every other row back to the Python loop's own body (``fallback``), with a function
 * that reads from the same connection (the same snapshot of the table). So a row is written
 * by exactly one of two implementations of one rule, and both write the same bytes (the
 * tests export every kind of row both ways and compare the shards).
 *
 * What it writes, as the Python loop does:
 *   - the record: the fields in the order of ``prefixes`` (``{"id": ``, ``, "state": `` ...),
 *     each value as the json module's encoder writes it (strings escaped as
 *     ``json.encoder.encode_basestring`` escapes them: '"', '\\', \b \f \n \r \t and the other
 *     control characters as \u00XX, lowercase; everything else as it is, in UTF-8);
 *   - the sample's tar members KEY.png (a done job whose file exists), KEY.json and KEY.txt
 *     (the prompt), each a ustar header (mode 0644, uid/gid 0, mtime 0) and the data padded
 *     to 512 bytes, handed to the writer (batcher.shards.TarShards) a megabyte at a time,
 *     its shards ending where TarShards._shard_for ends them;
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
#include <sqlite3.h>
#include <string.h>
#include <unistd.h>

/* The columns of the query, in the order of leanexport._NAMES, then the rowid. */
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
    K_ENC,    /* a string, escaped (a row with anything else goes back to Python) */
    K_NUM,    /* null, an int's digits, a float's repr (as the json module writes them) */
    K_BOOL,   /* true / false by the value's truth */
    K_TEXT,   /* null, or a string escaped */
    K_N,      /* n, 1 for 0 */
    K_NEG,    /* the params' negative_prompt as JSON */
    K_WM,     /* the params' watermark as JSON */
    K_FILE,   /* "images/<output>" for a done job, else null */
    K_ONE,    /* 1: the image index of a job of one image */
    K_COST,   /* the cost's JSON, from micros */
    K_ACTUAL, /* the prompt the image was made from, or null before it was generated */
    K_TIME,   /* a time's ISO 8601 JSON string, or null */
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
#define FALLBACK 1        /* a row this module does not write: the Python loop does */
#define CHUNK (1 << 20)   /* pending bytes of a split handed to the writer at once */
#define SECONDS 512       /* the texts of whole seconds kept here (a direct-mapped table) */

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

/* A column of the current row, as SQLite gives it (text as UTF-8, valid: checked on read) */
typedef struct {
    int type; /* SQLITE_INTEGER, SQLITE_FLOAT, SQLITE_TEXT, SQLITE_BLOB, SQLITE_NULL */
    const char *text;
    Py_ssize_t len;
    sqlite3_int64 i;
    double d;
} Col;

/* A value kept with the bytes of the column it was made from: the next row's same text
 * (the same state, model, size, params...) takes it without making a new object */
typedef struct {
    PyObject *obj; /* owned, or NULL */
    char *key;
    Py_ssize_t len;
    int type;
} Memo;

/* The answers of a cache for the last texts seen, by a hash of their bytes: most rows'
 * params and variables are found here, without making their text a str to look it up */
#define SLOTS 64

/* A split's samples not handed to its shard yet: the bytes in its open shard when last
 * asked (``base``), those waiting here, and whether its open shard is to be closed first */
typedef struct {
    PyObject *split; /* owned */
    long long base;
    int roll;
    int stale; /* base to be asked again (a row written by Python came between) */
    Buf pending;
} Shard;

typedef struct {
    long long second; /* LLONG_MIN: empty */
    char text[40];
    int len;
} Second;

/* The connection the rows are read from, shared with the fetch function handed to Python */
typedef struct {
    sqlite3 *db;
} Conn;

/* What the export hands over: the dicts the counts go into, the caches and the functions
 * behind them, the writer, and the Python loop's body for every other row. All borrowed
 * references, but for those said to be owned. */
typedef struct {
    PyObject *prefixes;  /* tuple of bytes: the record's text before each field, then "}" */
    Py_ssize_t n_vars;   /* manifest variables after the built-in fields */
    int dirfd;           /* the images folder, open */
    PyObject *splits;    /* frozenset: the split folders' names */
    PyObject *split_names; /* owned: a tuple of them */
    PyObject *data;      /* owned: "data", the split of an output in none */
    const char *done;    /* "done" */
    Py_ssize_t done_len;
    const char *emulator; /* the emulator's endpoint */
    Py_ssize_t emulator_len;
    PyObject *numbers;   /* dict: split -> samples numbered so far */
    PyObject *states, *per_split, *models, *sizes, *languages, *costs; /* dicts of counts */
    PyObject *params_cache, *params_of; /* params text -> (negative, watermark) JSON */
    PyObject *cost_cache, *cost_of;     /* micros -> cost JSON */
    PyObject *vars_cache, *vars_of;     /* vars text -> tuple of the variables' JSON */
    PyObject *second_cache, *second_of; /* whole second -> '"YYYY-MM-DDTHH:MM:SS.' */
    PyObject *writer;    /* batcher.shards.TarShards: add_chunk(split, chunk, roll), current */
    long long limit;     /* its shard size */
    PyObject *fallback;  /* fallback(rowid, fetch): the Python loop's body, for a row */
    PyObject *fetch;     /* owned: fetch(sql, params) -> rows, on this connection */
    PyObject *zh, *en, *other; /* the languages' names */
    Shard *shards;       /* the splits' pending samples */
    int n_shards;
    Col col[N_COLUMNS];
    Memo state, model, size, currency;        /* the counts' keys */
    Memo micros_key;                          /* the cost cache's key, and its answer: */
    PyObject *cost_val;                       /* owned */
    Memo params_slots[SLOTS], vars_slots[SLOTS]; /* params text, vars text -> their JSON */
    Second seconds[SECONDS];
    Buf rec, img;
    long long records, missing, image_bytes;
    int have_stamp;
    Col low, high; /* the earliest and latest created or finished time (int or float) */
} Ctx;

/* ---- UTF-8 ---------------------------------------------------------------------------- */

/* Whether ``s`` is UTF-8 as Python's strict decoder takes it (no overlong form, no
 * surrogate, nothing past U+10FFFF): a text that is not is read by Python, which says so */
static int
valid_utf8(const unsigned char *s, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        int extra;
        unsigned int cp, min;
        if ((c & 0xe0) == 0xc0) {
            extra = 1, cp = c & 0x1f, min = 0x80;
        }
        else if ((c & 0xf0) == 0xe0) {
            extra = 2, cp = c & 0x0f, min = 0x800;
        }
        else if ((c & 0xf8) == 0xf0) {
            extra = 3, cp = c & 0x07, min = 0x10000;
        }
        else {
            return 0;
        }
        if (i + extra >= n) {
            return 0;
        }
        for (int k = 1; k <= extra; k++) {
            unsigned char d = s[i + k];
            if ((d & 0xc0) != 0x80) {
                return 0;
            }
            cp = (cp << 6) | (d & 0x3f);
        }
        if (cp < min || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff)) {
            return 0;
        }
        i += extra + 1;
    }
    return 1;
}

/* ---- the record's values ------------------------------------------------------------ */

static int
escape_into(Buf *b, const char *s, Py_ssize_t n)
{
    if (grow(b, 6 * n) < 0) {
        return -1;
    }
    static const char hex[] = "0123456789abcdef";
    char *o = b->p + b->len;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
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
    b->len = o - b->p;
    return 0;
}

static int
escaped(Buf *b, const Col *v)
{
    if (add(b, "\"", 1) < 0 || escape_into(b, v->text, v->len) < 0) {
        return -1;
    }
    return add(b, "\"", 1);
}

static int
utf8(Buf *b, PyObject *s)
{
    if (!PyUnicode_Check(s)) {
        PyErr_SetString(PyExc_TypeError, "write_rows: a JSON text is not a str");
        return -1;
    }
    Py_ssize_t n;
    const char *u = PyUnicode_AsUTF8AndSize(s, &n);
    return u == NULL ? -1 : add(b, u, n);
}

/* ``x``'s decimal digits at ``out`` (room for 21): their count */
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

/* A number column (of the types plain() lets through) as JSON */
static int
number(Buf *b, const Col *v)
{
    if (v->type == SQLITE_NULL) {
        return add(b, "null", 4);
    }
    if (v->type == SQLITE_INTEGER) {
        char digits[24];
        return add(b, digits, decimal(digits, v->i));
    }
    /* a finite float, as float.__repr__ (the json module's) writes it */
    char *text = PyOS_double_to_string(v->d, 'r', 0, Py_DTSF_ADD_DOT_0, NULL);
    if (text == NULL) {
        return -1;
    }
    int r = add(b, text, (Py_ssize_t)strlen(text));
    PyMem_Free(text);
    return r;
}

/* A column's value as Python has it (None, int, float, str or bytes): a new reference */
static PyObject *
as_python(const Col *v)
{
    switch (v->type) {
    case SQLITE_INTEGER:
        return PyLong_FromLongLong(v->i);
    case SQLITE_FLOAT:
        return PyFloat_FromDouble(v->d);
    case SQLITE_TEXT:
        return PyUnicode_DecodeUTF8(v->text, v->len, "strict");
    case SQLITE_BLOB:
        return PyBytes_FromStringAndSize(v->text, v->len);
    default:
        Py_RETURN_NONE;
    }
}

/* Whether ``m`` holds the object made from these bytes */
static int
holds(const Memo *m, const char *key, Py_ssize_t len, int type)
{
    return m->obj != NULL && m->type == type && m->len == len &&
           (len == 0 || memcmp(m->key, key, (size_t)len) == 0);
}

/* ``obj`` (a new reference, taken) kept in ``m`` with the bytes it was made from: borrowed */
static PyObject *
keep(Memo *m, const char *key, Py_ssize_t len, int type, PyObject *obj)
{
    char *copy = PyMem_Realloc(m->key, (size_t)(len ? len : 1));
    if (copy == NULL) {
        Py_DECREF(obj);
        PyErr_NoMemory();
        return NULL;
    }
    if (len) {
        memcpy(copy, key, (size_t)len);
    }
    m->key = copy;
    m->len = len;
    m->type = type;
    Py_XSETREF(m->obj, obj);
    return obj;
}

/* The object made from column ``v`` (by as_python), kept in ``m`` for the next row with the
 * same value: a borrowed reference */
static PyObject *
memo(Memo *m, const Col *v)
{
    Py_ssize_t len = v->type == SQLITE_TEXT || v->type == SQLITE_BLOB ? v->len
                     : v->type == SQLITE_NULL                        ? 0
                                                                     : (Py_ssize_t)sizeof v->i;
    const char *key = v->type == SQLITE_TEXT || v->type == SQLITE_BLOB ? v->text
                      : v->type == SQLITE_INTEGER                     ? (const char *)&v->i
                                                                      : (const char *)&v->d;
    if (holds(m, key, len, v->type)) {
        return m->obj;
    }
    PyObject *obj = as_python(v);
    return obj == NULL ? NULL : keep(m, key, len, v->type, obj);
}

static void
forget(Memo *m)
{
    Py_CLEAR(m->obj);
    PyMem_Free(m->key);
    m->key = NULL;
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

/* The value of ``of(column)`` through its cache, kept with the column's bytes for the next
 * row of the same value (``m`` holds the answer, ``key`` the column's object) */
static PyObject *
looked_up(PyObject **val, Memo *key, PyObject *cache, PyObject *of, const Col *v)
{
    PyObject *before = key->obj; /* alive until memo() has made the new key, if any */
    PyObject *k = memo(key, v);
    if (k == NULL) {
        return NULL;
    }
    if (k == before && *val != NULL) {
        return *val;
    }
    PyObject *got = cached(cache, of, k);
    if (got == NULL) {
        return NULL;
    }
    Py_XSETREF(*val, got);
    return got;
}

/* The answer of ``of(column)`` through its cache, for a text or NULL column, kept in
 * ``slots`` by the column's bytes: a borrowed reference */
static PyObject *
slot_lookup(Memo *slots, PyObject *cache, PyObject *of, const Col *v)
{
    Py_ssize_t len = v->type == SQLITE_TEXT ? v->len : 0;
    unsigned long long h = 1469598103934665603ULL ^ (unsigned long long)v->type;
    for (Py_ssize_t i = 0; i < len; i++) { /* FNV-1a */
        h = (h ^ (unsigned char)v->text[i]) * 1099511628211ULL;
    }
    Memo *s = &slots[h % SLOTS];
    if (holds(s, v->text, len, v->type)) {
        return s->obj;
    }
    PyObject *key = as_python(v);
    if (key == NULL) {
        return NULL;
    }
    PyObject *got = cached(cache, of, key);
    Py_DECREF(key);
    return got == NULL ? NULL : keep(s, v->text, len, v->type, got);
}

static void
free_slots(Memo *slots)
{
    for (int i = 0; i < SLOTS; i++) {
        forget(&slots[i]);
    }
}

/* A time column's JSON, as leanexport._json_time writes it: FALLBACK for another type */
static int
when(Ctx *c, Buf *b, const Col *v)
{
    if (v->type == SQLITE_NULL) {
        return add(b, "null", 4);
    }
    long long second;
    long long micros = 0;
    if (v->type == SQLITE_FLOAT) {
        double stamp = v->d;
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
    else if (v->type == SQLITE_INTEGER) {
        second = v->i;
    }
    else {
        return FALLBACK;
    }
    Second *s = &c->seconds[(unsigned long long)second % SECONDS];
    if (s->len == 0 || s->second != second) {
        PyObject *key = PyLong_FromLongLong(second);
        if (key == NULL) {
            return -1;
        }
        PyObject *head = cached(c->second_cache, c->second_of, key);
        Py_DECREF(key);
        if (head == NULL) {
            return -1;
        }
        Py_ssize_t n = 0;
        const char *u = PyUnicode_Check(head) ? PyUnicode_AsUTF8AndSize(head, &n) : NULL;
        if (u == NULL || n >= (Py_ssize_t)sizeof s->text) {
            if (!PyErr_Occurred()) {
                PyErr_SetString(PyExc_TypeError, "write_rows: second_of gave no time text");
            }
            Py_DECREF(head);
            return -1;
        }
        memcpy(s->text, u, (size_t)n);
        s->len = (int)n;
        s->second = second;
        Py_DECREF(head);
    }
    if (add(b, s->text, s->len) < 0) {
        return -1;
    }
    int ms = (int)(micros / 1000);
    char tail[5] = {(char)('0' + ms / 100), (char)('0' + ms / 10 % 10), (char)('0' + ms % 10),
                    'Z', '"'};
    return add(b, tail, 5);
}

static int
text_value(Buf *b, const Col *v)
{
    if (v->type == SQLITE_NULL) {
        return add(b, "null", 4);
    }
    return v->type == SQLITE_TEXT ? escaped(b, v) : FALLBACK;
}

/* Python's truth of a column's value */
static int
truth(const Col *v)
{
    switch (v->type) {
    case SQLITE_INTEGER:
        return v->i != 0;
    case SQLITE_FLOAT:
        return v->d != 0.0;
    case SQLITE_TEXT:
    case SQLITE_BLOB:
        return v->len > 0;
    default:
        return 0;
    }
}

/* The record of the current row into c->rec: 0, FALLBACK or -1 */
static int
record(Ctx *c, int done)
{
    const Col *col = c->col;
    Buf *b = &c->rec;
    b->len = 0;
    PyObject *params = NULL, *vars = NULL; /* borrowed from their memos */
    int r = 0;
    for (Py_ssize_t i = 0; i < N_FIELDS + c->n_vars && r == 0; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(c->prefixes, i);
        r = add(b, PyBytes_AS_STRING(prefix), PyBytes_GET_SIZE(prefix));
        if (r != 0) {
            break;
        }
        if (i >= N_FIELDS) { /* a manifest variable */
            if (vars == NULL) {
                const Col *v = &col[C_VARS];
                if (v->type != SQLITE_TEXT && v->type != SQLITE_NULL) {
                    r = FALLBACK;
                    break;
                }
                vars = slot_lookup(c->vars_slots, c->vars_cache, c->vars_of, v);
                if (vars == NULL) {
                    r = -1;
                    break;
                }
                if (!PyTuple_Check(vars) || PyTuple_GET_SIZE(vars) != c->n_vars) {
                    PyErr_SetString(PyExc_TypeError, "write_rows: vars_of gave other values");
                    r = -1;
                    break;
                }
            }
            r = utf8(b, PyTuple_GET_ITEM(vars, i - N_FIELDS));
            continue;
        }
        const Field f = FIELDS[i];
        const Col *v = &col[f.col];
        switch (f.kind) {
        case K_ENC:
            r = v->type == SQLITE_TEXT ? escaped(b, v) : FALLBACK;
            break;
        case K_NUM:
            r = number(b, v);
            break;
        case K_BOOL:
            r = truth(v) ? add(b, "true", 4) : add(b, "false", 5);
            break;
        case K_TEXT:
            r = text_value(b, v);
            break;
        case K_N:
            r = v->i ? number(b, v) : add(b, "1", 1);
            break;
        case K_NEG:
        case K_WM:
            if (v->type == SQLITE_NULL) {
                r = add(b, "null", 4);
                break;
            }
            if (v->type != SQLITE_TEXT) {
                r = FALLBACK;
                break;
            }
            if (params == NULL) {
                params = slot_lookup(c->params_slots, c->params_cache, c->params_of, v);
                if (params == NULL) {
                    r = -1;
                    break;
                }
                if (!PyTuple_Check(params) || PyTuple_GET_SIZE(params) != 2) {
                    PyErr_SetString(PyExc_TypeError, "write_rows: params_of gave other values");
                    r = -1;
                    break;
                }
            }
            r = utf8(b, PyTuple_GET_ITEM(params, f.kind == K_NEG ? 0 : 1));
            break;
        case K_FILE:
            if (!done) {
                r = add(b, "null", 4);
            }
            else if (add(b, "\"images/", 8) < 0 || escape_into(b, v->text, v->len) < 0) {
                r = -1;
            }
            else {
                r = add(b, "\"", 1);
            }
            break;
        case K_ONE:
            r = add(b, "1", 1);
            break;
        case K_COST: {
            if (v->type != SQLITE_INTEGER && v->type != SQLITE_NULL) {
                r = FALLBACK; /* Decimal(int(micros)) of another type: Python's */
                break;
            }
            PyObject *cost =
                looked_up(&c->cost_val, &c->micros_key, c->cost_cache, c->cost_of, v);
            r = cost == NULL ? -1 : utf8(b, cost);
            break;
        }
        case K_ACTUAL:
            if (col[C_GENERATED].type == SQLITE_NULL && col[C_REQUEST_ID].type == SQLITE_NULL) {
                r = add(b, "null", 4);
            }
            else if (v->type == SQLITE_TEXT && v->len > 0) {
                r = escaped(b, v);
            }
            else if (v->type == SQLITE_NULL || v->type == SQLITE_TEXT) {
                r = escaped(b, &col[C_PROMPT]);
            }
            else {
                r = FALLBACK; /* str() of a number or of bytes: Python's */
            }
            break;
        case K_TIME:
            r = when(c, b, v);
            break;
        }
    }
    if (r == 0) {
        r = add(b, "}", 1);
    }
    return r;
}

/* ---- the image -------------------------------------------------------------------- */

/* The file at ``path`` (relative to the images folder) into c->img: 0 read, 1 missing (no
 * such file), -1 an error (an OSError raised). As batcher.shardexport.read_file: one read
 * of one byte more than the recorded size, more only when the file grew. */
static int
read_image(Ctx *c, const Col *path, const Col *nbytes)
{
    long long size = nbytes->type == SQLITE_INTEGER && nbytes->i > 0 ? nbytes->i : 0;
    int fd = openat(c->dirfd, path->text, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT) {
            return 1;
        }
        goto error;
    }
    Buf *b = &c->img;
    b->len = 0;
    Py_ssize_t want = (Py_ssize_t)size + 1;
    for (;;) {
        if (grow(b, want) < 0) {
            close(fd);
            return -1;
        }
        ssize_t got = read(fd, b->p + b->len, (size_t)want);
        if (got < 0) {
            if (errno == EINTR) {
                if (PyErr_CheckSignals() < 0) {
                    close(fd);
                    return -1;
                }
                continue;
            }
            int saved = errno;
            close(fd);
            errno = saved;
            goto error;
        }
        b->len += got;
        if (got < want) {
            break;
        }
        want = want > (1 << 20) ? want : (1 << 20);
    }
    close(fd);
    return 0;
error: {
    int saved = errno;
    PyObject *name = PyUnicode_DecodeUTF8(path->text, path->len, "surrogateescape");
    errno = saved;
    if (name != NULL) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, name);
        Py_DECREF(name);
    }
    return -1;
}
}

/* ---- the tar members -------------------------------------------------------------- */

/* The ustar header of a member, but for its name, size and checksum: mode 0644, uid and gid
 * 0, mtime 0, a regular file, no user or group name (as batcher.shards' _USTAR) */
static unsigned char USTAR[BLOCK];
static unsigned long USTAR_SUM; /* its bytes' sum, the checksum field counted as spaces */

static void
init_ustar(void)
{
    memset(USTAR, 0, BLOCK);
    memcpy(USTAR + 100, "0000644", 8);
    memcpy(USTAR + 108, "0000000", 8);
    memcpy(USTAR + 116, "0000000", 8);
    memcpy(USTAR + 136, "00000000000", 12);
    USTAR[156] = '0';
    memcpy(USTAR + 257, "ustar", 6);
    USTAR[263] = '0';
    USTAR[264] = '0';
    USTAR_SUM = 8 * ' ';
    for (int i = 0; i < BLOCK; i++) {
        USTAR_SUM += USTAR[i];
    }
}

/* A member's header, data and padding at the end of ``b``, which has room for them */
static void
member(Buf *b, const char *key, Py_ssize_t klen, const char *ext, const char *data,
       Py_ssize_t size)
{
    unsigned char *h = (unsigned char *)b->p + b->len;
    memcpy(h, USTAR, BLOCK);
    size_t elen = strlen(ext);
    memcpy(h, key, (size_t)klen);
    memcpy(h + klen, ext, elen);
    octal(h + 124, (unsigned long long)size, 11);
    unsigned long sum = USTAR_SUM;
    for (Py_ssize_t i = 0; i < klen + (Py_ssize_t)elen; i++) {
        sum += h[i];
    }
    for (int i = 124; i < 135; i++) {
        sum += h[i];
    }
    octal(h + 148, sum, 6);
    h[155] = ' ';
    b->len += BLOCK;
    if (size) {
        memcpy(b->p + b->len, data, (size_t)size);
    }
    b->len += size;
    Py_ssize_t pad = (-size) & (BLOCK - 1);
    memset(b->p + b->len, 0, (size_t)pad);
    b->len += pad;
}

static Py_ssize_t
padded(Py_ssize_t size)
{
    return BLOCK + size + ((-size) & (BLOCK - 1));
}

/* ---- the card's counts ------------------------------------------------------------ */

/* dict[key] += 1 (from 0), as a Counter counts; ``before``, when given, gets the value it had */
static int
bump(PyObject *dict, PyObject *key, long long *before)
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
    if (before != NULL) {
        *before = x;
    }
    return r;
}

static int
count(PyObject *dict, PyObject *key)
{
    return bump(dict, key, NULL);
}

static int
count_memo(PyObject *dict, Memo *m, const Col *v)
{
    PyObject *key = memo(m, v);
    return key == NULL ? -1 : count(dict, key);
}

/* batcher.card.prompt_language of a prompt in UTF-8: zh with a CJK ideograph (U+3400-4DBF,
 * U+4E00-9FFF, three bytes each), else en with a Latin letter, else other */
static PyObject *
language(Ctx *c, const Col *prompt)
{
    const unsigned char *s = (const unsigned char *)prompt->text;
    Py_ssize_t n = prompt->len;
    int latin = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char ch = s[i];
        if ((ch >= 'A' && ch <= 'Z') || (ch >= 'a' && ch <= 'z')) {
            latin = 1;
        }
        else if ((ch & 0xf0) == 0xe0 && i + 2 < n) {
            unsigned int cp = ((ch & 0x0fu) << 12) | ((s[i + 1] & 0x3fu) << 6) | (s[i + 2] & 0x3fu);
            if ((cp >= 0x3400 && cp <= 0x4dbf) || (cp >= 0x4e00 && cp <= 0x9fff)) {
                return c->zh;
            }
            i += 2;
        }
    }
    return latin ? c->en : c->other;
}

/* Python's ``a < b`` of two times (int or float) */
static int
earlier(const Col *a, const Col *b)
{
    if (a->type == SQLITE_INTEGER && b->type == SQLITE_INTEGER) {
        return a->i < b->i;
    }
    long double x = a->type == SQLITE_INTEGER ? (long double)a->i : (long double)a->d;
    long double y = b->type == SQLITE_INTEGER ? (long double)b->i : (long double)b->d;
    return x < y;
}

/* A created or finished time into the earliest and latest seen (the first of equals kept,
 * as min() and max() keep it) */
static void
stamp(Ctx *c, const Col *v)
{
    if (v->type != SQLITE_INTEGER && v->type != SQLITE_FLOAT) {
        return; /* NULL (when() sent any other type to Python) */
    }
    if (!c->have_stamp) {
        c->low = c->high = *v;
        c->have_stamp = 1;
        return;
    }
    if (earlier(v, &c->low)) {
        c->low = *v;
    }
    if (earlier(&c->high, v)) {
        c->high = *v;
    }
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
hand_over_all(Ctx *c)
{
    for (int i = 0; i < c->n_shards; i++) {
        if (hand_over(c, &c->shards[i]) < 0) {
            return -1;
        }
        c->shards[i].stale = 1;
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

/* ---- one row ---------------------------------------------------------------------- */

static int
is_key_char(unsigned char ch)
{
    return (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') || (ch >= '0' && ch <= '9') ||
           ch == '_' || ch == '-';
}

/* Whether the row's numbers are of the types the job store writes (a hand-edited table's
 * row is written by Python, as leanexport._PLAIN says) and its strings are what this loop
 * writes as they are: an ASCII id, texts Python decodes, an output path with no NUL */
static int
plain(const Col *col)
{
    static const int ints[] = {C_WIDTH, C_HEIGHT, C_BYTES, C_ATTEMPTS, C_INPUT_TOKENS,
                               C_OUTPUT_TOKENS, C_TOTAL_TOKENS, C_BILLED, C_THROTTLED,
                               C_AMBIGUOUS, C_REGENERATED};
    if (col[C_SEED].type != SQLITE_INTEGER || col[C_N].type != SQLITE_INTEGER) {
        return 0;
    }
    for (size_t i = 0; i < sizeof ints / sizeof ints[0]; i++) {
        int t = col[ints[i]].type;
        if (t != SQLITE_NULL && t != SQLITE_INTEGER) {
            return 0;
        }
    }
    const Col *latency = &col[C_LATENCY];
    if (latency->type != SQLITE_NULL && (latency->type != SQLITE_FLOAT || !isfinite(latency->d))) {
        return 0;
    }
    const Col *id = &col[C_ID], *output = &col[C_OUTPUT];
    if (id->type != SQLITE_TEXT || output->type != SQLITE_TEXT) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < id->len; i++) {
        if ((unsigned char)id->text[i] >= 0x80) {
            return 0; /* its sample key is not ASCII: a pax header, written by Python */
        }
    }
    if ((Py_ssize_t)strlen(output->text) != output->len) {
        return 0; /* a NUL in a path: Python says so */
    }
    for (int i = 0; i < N_COLUMNS; i++) {
        if (col[i].type == SQLITE_TEXT &&
            !valid_utf8((const unsigned char *)col[i].text, col[i].len)) {
            return 0; /* Python's sqlite3 refuses it, and the export says so */
        }
    }
    return 1;
}

static void
read_columns(Ctx *c, sqlite3_stmt *stmt)
{
    for (int i = 0; i < N_COLUMNS; i++) {
        Col *v = &c->col[i];
        v->type = sqlite3_column_type(stmt, i);
        switch (v->type) {
        case SQLITE_INTEGER:
            v->i = sqlite3_column_int64(stmt, i);
            break;
        case SQLITE_FLOAT:
            v->d = sqlite3_column_double(stmt, i);
            break;
        case SQLITE_TEXT:
            v->text = (const char *)sqlite3_column_text(stmt, i);
            v->len = sqlite3_column_bytes(stmt, i);
            if (v->text == NULL) { /* out of memory */
                v->text = "";
                v->type = SQLITE_BLOB; /* not written here: Python reads it and says why */
            }
            break;
        case SQLITE_BLOB:
            v->text = (const char *)sqlite3_column_blob(stmt, i);
            v->len = sqlite3_column_bytes(stmt, i);
            if (v->text == NULL) {
                v->text = "";
            }
            break;
        default:
            break;
        }
    }
}

/* The split of an output path: its first folder when that is one of the split folders, else
 * "data": a borrowed reference (the frozenset's own string, or c->data) */
static PyObject *
split_of(Ctx *c, const Col *output)
{
    const char *slash = memchr(output->text, '/', (size_t)output->len);
    if (slash == NULL) {
        return c->data;
    }
    Py_ssize_t n = slash - output->text;
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(c->split_names); i++) {
        PyObject *name = PyTuple_GET_ITEM(c->split_names, i);
        Py_ssize_t len;
        const char *u = PyUnicode_AsUTF8AndSize(name, &len);
        if (u == NULL) {
            return NULL;
        }
        if (len == n && memcmp(u, output->text, (size_t)n) == 0) {
            return name;
        }
    }
    return c->data;
}

/* Write the current row: 0, FALLBACK (nothing done: Python writes it) or -1 */
static int
row(Ctx *c)
{
    const Col *col = c->col;
    if (!plain(col)) {
        return FALLBACK;
    }
    const Col *st = &col[C_STATE];
    int done = st->type == SQLITE_TEXT && st->len == c->done_len &&
               memcmp(st->text, c->done, (size_t)st->len) == 0;
    long long n = col[C_N].i;
    if (n > 1 && done) {
        return FALLBACK; /* a row per image: the general path's records */
    }
    if (n == 0) {
        n = 1;
    }
    int r = record(c, done);
    if (r != 0) {
        return r;
    }
    /* past here the row is this loop's: nothing hands it back */
    const Col *output = &col[C_OUTPUT], *prompt = &col[C_PROMPT];
    PyObject *split = split_of(c, output);
    if (split == NULL) {
        return -1;
    }
    int missing = 1;
    if (done) {
        missing = read_image(c, output, &col[C_BYTES]);
        if (missing < 0) {
            return -1;
        }
        if (missing) {
            c->missing += 1;
        }
        else {
            c->image_bytes += c->img.len;
        }
        if (count_memo(c->sizes, &c->size, &col[C_SIZE]) < 0) {
            return -1;
        }
    }
    /* the sample's number within its split, and its key */
    long long number;
    if (bump(c->numbers, split, &number) < 0) {
        return -1;
    }
    char key[128];
    int klen = decimal(key, number); /* as "%06d": at least six digits */
    if (klen < 6) {
        memmove(key + 6 - klen, key, (size_t)klen);
        memset(key, '0', (size_t)(6 - klen));
        klen = 6;
    }
    key[klen++] = '_';
    const Col *id = &col[C_ID];
    Py_ssize_t nlen = 0;
    for (Py_ssize_t i = 0; i < id->len && nlen < 80; i++) {
        key[klen + nlen++] = is_key_char((unsigned char)id->text[i]) ? id->text[i] : '_';
    }
    if (n != 1) { /* a job of several images not done yet: "<id>-1", cut to 80 as a whole */
        if (nlen < 80) {
            key[klen + nlen++] = '-';
        }
        if (nlen < 80) {
            key[klen + nlen++] = '1';
        }
    }
    klen += (int)nlen;
    if (klen > 95) {
        PyErr_SetString(PyExc_ValueError, "write_rows: a sample key longer than a tar name");
        return -1;
    }
    /* the members, after the split's pending samples */
    Py_ssize_t size = padded(c->rec.len) + padded(prompt->len);
    if (!missing) {
        size += padded(c->img.len);
    }
    Shard *sh = shard_for(c, split, size);
    if (sh == NULL) {
        return -1;
    }
    Buf *o = &sh->pending;
    if (!missing) {
        member(o, key, klen, ".png", c->img.p, c->img.len);
    }
    member(o, key, klen, ".json", c->rec.p, c->rec.len);
    member(o, key, klen, ".txt", prompt->text, prompt->len);
    if (o->len >= CHUNK && hand_over(c, sh) < 0) {
        return -1;
    }
    /* the card's counts, as batcher.card.CardFacts.add counts a job */
    c->records += 1;
    if (count_memo(c->states, &c->state, st) < 0 || count(c->per_split, split) < 0 ||
        count_memo(c->models, &c->model, &col[C_MODEL]) < 0 ||
        count(c->languages, language(c, prompt)) < 0) {
        return -1;
    }
    const Col *currency = &col[C_CURRENCY];
    if (truth(currency)) {
        const Col *endpoint = &col[C_ENDPOINT];
        int emulated = endpoint->type == SQLITE_TEXT && endpoint->len == c->emulator_len &&
                       memcmp(endpoint->text, c->emulator, (size_t)endpoint->len) == 0;
        PyObject *cur = memo(&c->currency, currency);
        PyObject *micros = cur == NULL ? NULL : memo(&c->micros_key, &col[C_MICROS]);
        if (micros == NULL) {
            return -1;
        }
        PyObject *k = PyTuple_Pack(3, cur, micros, emulated ? Py_True : Py_False);
        if (k == NULL) {
            return -1;
        }
        int cr = count(c->costs, k);
        Py_DECREF(k);
        if (cr < 0) {
            return -1;
        }
    }
    stamp(c, &col[C_CREATED]);
    stamp(c, &col[C_FINISHED]);
    return 0;
}

/* ---- reading from the row's connection, for Python ------------------------------------ */

static PyObject *sqlite_error; /* sqlite3.OperationalError, as the sqlite3 module raises */

static PyObject *
failed(sqlite3 *db)
{
    PyErr_SetString(sqlite_error, db != NULL ? sqlite3_errmsg(db) : "no connection");
    return NULL;
}

static int
bind(sqlite3 *db, sqlite3_stmt *stmt, PyObject *params)
{
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(params); i++) {
        PyObject *p = PyTuple_GET_ITEM(params, i);
        int rc, at = (int)i + 1;
        if (p == Py_None) {
            rc = sqlite3_bind_null(stmt, at);
        }
        else if (PyLong_Check(p)) {
            long long x = PyLong_AsLongLong(p);
            if (x == -1 && PyErr_Occurred()) {
                return -1;
            }
            rc = sqlite3_bind_int64(stmt, at, x);
        }
        else if (PyFloat_Check(p)) {
            rc = sqlite3_bind_double(stmt, at, PyFloat_AS_DOUBLE(p));
        }
        else if (PyUnicode_Check(p)) {
            Py_ssize_t n;
            const char *u = PyUnicode_AsUTF8AndSize(p, &n);
            if (u == NULL) {
                return -1;
            }
            rc = sqlite3_bind_text64(stmt, at, u, (sqlite3_uint64)n, SQLITE_TRANSIENT, SQLITE_UTF8);
        }
        else {
            PyErr_SetString(PyExc_TypeError, "fetch: a parameter of another type");
            return -1;
        }
        if (rc != SQLITE_OK) {
            failed(db);
            return -1;
        }
    }
    return 0;
}

/* fetch(sql, params) -> list of tuples: a query on the connection the rows are read from
 * (the same snapshot), its values as the sqlite3 module gives them */
static PyObject *
fetch(PyObject *capsule, PyObject *args)
{
    const char *sql;
    PyObject *params;
    if (!PyArg_ParseTuple(args, "sO!:fetch", &sql, &PyTuple_Type, &params)) {
        return NULL;
    }
    Conn *conn = PyCapsule_GetPointer(capsule, "batcher._speedups.Conn");
    if (conn == NULL) {
        return NULL;
    }
    if (conn->db == NULL) {
        return failed(NULL);
    }
    sqlite3_stmt *stmt;
    if (sqlite3_prepare_v2(conn->db, sql, -1, &stmt, NULL) != SQLITE_OK) {
        return failed(conn->db);
    }
    PyObject *rows = PyList_New(0);
    if (rows == NULL || bind(conn->db, stmt, params) < 0) {
        goto error;
    }
    int rc;
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        int n = sqlite3_column_count(stmt);
        PyObject *tuple = PyTuple_New(n);
        if (tuple == NULL) {
            goto error;
        }
        for (int i = 0; i < n; i++) {
            Col v = {.type = sqlite3_column_type(stmt, i)};
            if (v.type == SQLITE_INTEGER) {
                v.i = sqlite3_column_int64(stmt, i);
            }
            else if (v.type == SQLITE_FLOAT) {
                v.d = sqlite3_column_double(stmt, i);
            }
            else if (v.type == SQLITE_TEXT || v.type == SQLITE_BLOB) {
                v.text = v.type == SQLITE_TEXT ? (const char *)sqlite3_column_text(stmt, i)
                                               : (const char *)sqlite3_column_blob(stmt, i);
                v.len = sqlite3_column_bytes(stmt, i);
                if (v.text == NULL) {
                    v.text = "";
                }
            }
            PyObject *obj = as_python(&v);
            if (obj == NULL) {
                if (PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                    PyErr_Format(sqlite_error, "Could not decode to UTF-8 column '%s'",
                                 sqlite3_column_name(stmt, i));
                }
                Py_DECREF(tuple);
                goto error;
            }
            PyTuple_SET_ITEM(tuple, i, obj);
        }
        int appended = PyList_Append(rows, tuple);
        Py_DECREF(tuple);
        if (appended < 0) {
            goto error;
        }
    }
    if (rc != SQLITE_DONE) {
        failed(conn->db);
        goto error;
    }
    sqlite3_finalize(stmt);
    return rows;
error:
    Py_XDECREF(rows);
    sqlite3_finalize(stmt);
    return NULL;
}

static void
free_conn(PyObject *capsule)
{
    Conn *conn = PyCapsule_GetPointer(capsule, "batcher._speedups.Conn");
    if (conn != NULL) {
        if (conn->db != NULL) {
            sqlite3_close(conn->db);
        }
        PyMem_Free(conn);
    }
}

static PyMethodDef fetch_def = {"fetch", fetch, METH_VARARGS,
                                "fetch(sql, params) -> rows, on the export's connection"};

/* ---- the module --------------------------------------------------------------------- */

static const char write_rows_doc[] =
    "write_rows(uri, sql, params, prefixes, n_vars, dirfd, splits, done, emulator, numbers,\n"
    "           counts, caches, writer, shard_size, fallback, languages)\n"
    "    -> (records, missing, image_bytes, low, high)\n"
    "\n"
    "Open the SQLite database at ``uri`` (read-only) and write the WebDataset samples of\n"
    "the rows of ``sql`` (the job table's columns, then the rowid) to ``writer`` (a\n"
    "TarShards); for each row this module does not write, call ``fallback(rowid, fetch)``,\n"
    "``fetch(sql, params)`` reading from the same connection. ``counts``: the dicts\n"
    "(states, splits, models, sizes, languages, costs); ``caches``: (params cache,\n"
    "params_of, cost cache, cost_of, vars cache, vars_of, second cache, second_of);\n"
    "``languages``: the names (zh, en, other). Returns the counts of the rows written here\n"
    "and the earliest and latest of their created and finished times (None when none).";

static void
forget_all(Ctx *c)
{
    Memo *memos[] = {&c->state, &c->model, &c->size, &c->currency, &c->micros_key};
    for (size_t i = 0; i < sizeof memos / sizeof memos[0]; i++) {
        forget(memos[i]);
    }
    Py_CLEAR(c->cost_val);
    free_slots(c->params_slots);
    free_slots(c->vars_slots);
    for (int i = 0; i < c->n_shards; i++) {
        Py_DECREF(c->shards[i].split);
        PyMem_Free(c->shards[i].pending.p);
    }
    PyMem_Free(c->shards);
    PyMem_Free(c->rec.p);
    PyMem_Free(c->img.p);
}

static PyObject *
stamp_object(const Col *v)
{
    return v->type == SQLITE_INTEGER ? PyLong_FromLongLong(v->i) : PyFloat_FromDouble(v->d);
}

static PyObject *
write_rows(PyObject *module, PyObject *args)
{
    (void)module;
    const char *uri, *sql;
    PyObject *params, *counts, *caches, *langs, *done, *emulator;
    Ctx *c = PyMem_Calloc(1, sizeof(Ctx));
    if (c == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = NULL;
    sqlite3_stmt *stmt = NULL;
    Conn *conn = NULL;
    PyObject *capsule = NULL;
    if (!PyArg_ParseTuple(args, "ssO!O!niO!UUO!O!O!OLOO!:write_rows", &uri, &sql,
                          &PyTuple_Type, &params, &PyTuple_Type, &c->prefixes, &c->n_vars,
                          &c->dirfd, &PyFrozenSet_Type, &c->splits, &done, &emulator,
                          &PyDict_Type, &c->numbers, &PyTuple_Type, &counts, &PyTuple_Type,
                          &caches, &c->writer, &c->limit, &c->fallback, &PyTuple_Type,
                          &langs)) {
        goto done;
    }
    if (PyTuple_GET_SIZE(c->prefixes) != N_FIELDS + c->n_vars + 1 ||
        PyTuple_GET_SIZE(counts) != 6 || PyTuple_GET_SIZE(caches) != 8 ||
        PyTuple_GET_SIZE(langs) != 3) {
        PyErr_SetString(PyExc_ValueError, "write_rows: the fields or tuples do not match");
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(c->prefixes); i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(c->prefixes, i))) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a prefix is not bytes");
            goto done;
        }
    }
    PyObject **dicts[] = {&c->states, &c->per_split, &c->models, &c->sizes, &c->languages,
                          &c->costs};
    for (int i = 0; i < 6; i++) {
        *dicts[i] = PyTuple_GET_ITEM(counts, i);
        if (!PyDict_Check(*dicts[i])) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a count is not a dict");
            goto done;
        }
    }
    PyObject **cache[] = {&c->params_cache, &c->params_of, &c->cost_cache, &c->cost_of,
                          &c->vars_cache, &c->vars_of, &c->second_cache, &c->second_of};
    for (int i = 0; i < 8; i++) {
        *cache[i] = PyTuple_GET_ITEM(caches, i);
        if (i % 2 == 0 && !PyDict_Check(*cache[i])) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a cache is not a dict");
            goto done;
        }
    }
    c->zh = PyTuple_GET_ITEM(langs, 0);
    c->en = PyTuple_GET_ITEM(langs, 1);
    c->other = PyTuple_GET_ITEM(langs, 2);
    c->done = PyUnicode_AsUTF8AndSize(done, &c->done_len);
    c->emulator = PyUnicode_AsUTF8AndSize(emulator, &c->emulator_len);
    c->data = PyUnicode_InternFromString("data");
    c->split_names = PySequence_Tuple(c->splits);
    if (c->done == NULL || c->emulator == NULL || c->data == NULL || c->split_names == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(c->split_names); i++) {
        if (!PyUnicode_Check(PyTuple_GET_ITEM(c->split_names, i))) {
            PyErr_SetString(PyExc_TypeError, "write_rows: a split's name is not a str");
            goto done;
        }
    }
    conn = PyMem_Calloc(1, sizeof(Conn));
    if (conn == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    capsule = PyCapsule_New(conn, "batcher._speedups.Conn", free_conn);
    if (capsule == NULL) {
        PyMem_Free(conn);
        conn = NULL;
        goto done;
    }
    c->fetch = PyCFunction_New(&fetch_def, capsule);
    if (c->fetch == NULL) {
        goto done;
    }
    int rc = sqlite3_open_v2(uri, &conn->db, SQLITE_OPEN_READONLY | SQLITE_OPEN_URI, NULL);
    if (rc != SQLITE_OK) {
        failed(conn->db);
        goto done;
    }
    sqlite3_busy_timeout(conn->db, 15000); /* as the sqlite3 connection's timeout */
    if (sqlite3_prepare_v2(conn->db, sql, -1, &stmt, NULL) != SQLITE_OK ||
        sqlite3_column_count(stmt) != N_COLUMNS) {
        if (stmt != NULL) {
            PyErr_SetString(PyExc_ValueError, "write_rows: a query of other columns");
        }
        else {
            failed(conn->db);
        }
        goto done;
    }
    if (bind(conn->db, stmt, params) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < SECONDS; i++) {
        c->seconds[i].len = 0;
    }
    while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {
        read_columns(c, stmt);
        int r = row(c);
        if (r == FALLBACK) { /* written by Python, after the samples before it */
            PyObject *rowid = PyLong_FromLongLong(sqlite3_column_int64(stmt, C_ROWID));
            r = rowid == NULL || hand_over_all(c) < 0 ? -1 : 0;
            if (r == 0) {
                PyObject *res = PyObject_CallFunctionObjArgs(c->fallback, rowid, c->fetch, NULL);
                r = res == NULL ? -1 : 0;
                Py_XDECREF(res);
            }
            Py_XDECREF(rowid);
        }
        if (r < 0) {
            goto done;
        }
        if ((c->records & 1023) == 0 && PyErr_CheckSignals() < 0) {
            goto done; /* Ctrl-C */
        }
    }
    if (rc != SQLITE_DONE) {
        failed(conn->db);
        goto done;
    }
    if (hand_over_all(c) < 0) {
        goto done;
    }
    if (c->have_stamp) {
        PyObject *low = stamp_object(&c->low), *high = stamp_object(&c->high);
        if (low != NULL && high != NULL) {
            result = Py_BuildValue("LLLOO", c->records, c->missing, c->image_bytes, low, high);
        }
        Py_XDECREF(low);
        Py_XDECREF(high);
    }
    else {
        result = Py_BuildValue("LLLOO", c->records, c->missing, c->image_bytes, Py_None,
                               Py_None);
    }
done:
    sqlite3_finalize(stmt);
    if (conn != NULL) {
        sqlite3_close(conn->db);
        conn->db = NULL; /* a fetch kept past here says so, and reads nothing */
    }
    Py_XDECREF(c->fetch);
    Py_XDECREF(capsule); /* frees conn, unless Python kept fetch (which then reads nothing) */
    Py_XDECREF(c->data);
    Py_XDECREF(c->split_names);
    forget_all(c);
    PyMem_Free(c);
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
    init_ustar();
    PyObject *sqlite3_module = PyImport_ImportModule("sqlite3");
    if (sqlite3_module == NULL) {
        return NULL;
    }
    sqlite_error = PyObject_GetAttrString(sqlite3_module, "OperationalError");
    Py_DECREF(sqlite3_module);
    if (sqlite_error == NULL) {
        return NULL;
    }
    return PyModule_Create(&module);
}
