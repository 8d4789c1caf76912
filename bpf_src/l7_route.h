// SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause)
/* L7: the key HTTP/1 requests are summed by, a hash of the method and the path's route template.
 * Included by l7_summary.h and by the test fixture tests/bpf_fixtures/route.bpf.c. */
#ifndef KSCOPE_L7_ROUTE_H
#define KSCOPE_L7_ROUTE_H

/* ---- Route templates in the kernel ------------------------------------------------------
 *
 * Keyed by the raw path, /api/users/8812 and /api/users/8813 took a slot each, so with ids in
 * paths every request became a record of its own. The key hashes what user space makes of the
 * path instead (node_exporter/protocols/http_fields.py route_template, is_id_segment): per
 * segment the same id rules, a fixed token for an id, at most ROUTE_MAX_SEGMENTS segments and
 * then the REST token. A summary still carries its first request's head: user space templates
 * it, and that route is, by construction, every summed request's route.
 *
 * Where the kernel could disagree with user space, the request is not summed (key 0): a byte
 * user space rejects in a target (controls, DEL: the summary's head would not parse), a byte
 * >= 0x80 before the REST token (user space counts characters of the decoded text, and invalid
 * UTF-8 becomes "\xNN", four characters a byte), a path that does not end, followed by its
 * version, within the KSCOPE_L7_SUMMARY_HEAD bytes a summary keeps. Percent-encoding is not
 * decoded on either side: "%2F" is three characters there and three bytes here.
 * tests/node_exporter/l7/route_corpus.txt holds the paths both sides are checked on.
 */

#define ROUTE_MAX_SEGMENTS 8 /* http_fields.MAX_SEGMENTS */
#define ROUTE_MUL 0x9e3779b97f4a7c15ULL
#define ROUTE_SEED 0xcbf29ce484222325ULL
#define ROUTE_ID_TOKEN 0x7b69647dULL	/* "{id}": a segment's bytes never hash to a fixed word */
#define ROUTE_REST_TOKEN 0x7b72657374ULL /* "{rest}" */
#define ROUTE_VERSION_TAIL 10		 /* " HTTP/1.1\r" after the path, minus the path end's own byte */
#define HTTP_1_1 0x312e312f50545448ULL /* "HTTP/1.1" as a little-endian load */
#define HTTP_1_0 0x302e312f50545448ULL
#define ROUTE_UUID_DASHES ((1ULL << 8) | (1ULL << 13) | (1ULL << 18) | (1ULL << 23)) /* 8-4-4-4-12 */

enum route_class {
	RC_DIGIT = 1,  /* 0-9 */
	RC_HEX = 2,    /* 0-9 a-f A-F */
	RC_ALPHA = 4,  /* a-z A-Z */
	RC_DASH = 8,   /* '-' */
	RC_SLASH = 16, /* '/' */
	RC_END = 32,   /* ' ': the target ends */
	RC_CUT = 64,   /* '?', '#': the path ends (the query or fragment is not part of the route) */
	RC_BAD = 128,  /* a control byte or DEL (user space rejects the target), or >= 0x80 */
};

/* One load per byte instead of a chain of compares (each a branch the verifier walks). */
static const __u8 route_class[256] = {
	[0 ... 0x1f] = RC_BAD,
	[' '] = RC_END,
	['?'] = RC_CUT,
	['#'] = RC_CUT,
	['-'] = RC_DASH,
	['/'] = RC_SLASH,
	['0' ... '9'] = RC_DIGIT | RC_HEX,
	['A' ... 'F'] = RC_ALPHA | RC_HEX,
	['G' ... 'Z'] = RC_ALPHA,
	['a' ... 'f'] = RC_ALPHA | RC_HEX,
	['g' ... 'z'] = RC_ALPHA,
	[0x7f ... 0xff] = RC_BAD,
};

/* The request line's bytes as a global function takes them: a pointer to a sized object. */
struct route_line {
	__u8 b[KSCOPE_L7_SUMMARY_HEAD];
};

static __always_inline __u64 route_mix(__u64 h, __u64 v)
{
	h = (h ^ v) * ROUTE_MUL;
	return h ^ (h >> 29);
}

/* is_id_segment on a segment's length and the classes of its bytes (and: every byte's, or: any
 * byte's; uuid_bad: a byte off the 8-4-4-4-12 shape). */
static __always_inline bool route_is_id(__u32 len, __u32 and, __u32 or, __u32 uuid_bad)
{
	if (!len)
		return false;
	if ((and & RC_DIGIT) || (len == 36 && !uuid_bad) || len > 40)
		return true;
	if (len >= 12 && (or & RC_DIGIT) && (and & RC_HEX))
		return true;
	return len >= 16 && (or & RC_DIGIT) && (or & RC_ALPHA);
}

/* A path being scanned: the route's hash so far, the current segment's. */
struct route_scan {
	__u64 h;	/* method and the segments before this one */
	__u64 sh;	/* this segment's bytes */
	__u32 len;	/* this segment's bytes so far */
	__u32 and;	/* enum route_class of every byte of it */
	__u32 or;	/* ... of any byte */
	__u32 uuid_bad; /* a byte off the UUID shape */
	__u32 seg;	/* segments done */
	__u32 raw;	/* not a path ("*", absolute-form): hashed whole */
	__u32 rest;	/* past ROUTE_MAX_SEGMENTS: the REST token is in h, the rest does not count */
	__u32 query;	/* past the path (query, fragment): h is final, the target's end is looked for */
	__u32 at;	/* the byte of the word l7_route_word stopped at */
	__u32 _pad;
};

enum route_step {
	ROUTE_MORE = 0,	  /* go on */
	ROUTE_END = 1,	  /* the path ended at this byte: s->h is the key */
	ROUTE_REFUSE = 2, /* not to be summed */
};

static __always_inline void route_segment_done(struct route_scan *s)
{
	s->h = route_mix(s->h, !s->raw && route_is_id(s->len, s->and, s->or, s->uuid_bad) ? ROUTE_ID_TOKEN
											  : s->sh ^ s->len);
	s->sh = ROUTE_SEED;
	s->len = 0;
	s->and = 0xff;
	s->or = 0;
	s->uuid_bad = 0;
}

/* One byte of the path. */
static __always_inline int route_byte(struct route_scan *s, __u32 c)
{
	__u8 cls = route_class[c & 0xff];

	if (cls & RC_BAD)
		/* non-ASCII in the query or past the REST token: user space does not look at it */
		return c >= 0x80 && (s->rest || s->query) ? ROUTE_MORE : ROUTE_REFUSE;
	if (s->query)
		return cls & RC_END ? ROUTE_END : ROUTE_MORE;
	if (cls & (RC_END | RC_CUT)) {
		if (s->raw && !s->len)
			return ROUTE_REFUSE; /* an empty target: user space rejects the line */
		if (!s->rest)
			route_segment_done(s);
		s->h |= 1; /* 0 is "not summed" */
		s->query = 1;
		return cls & RC_END ? ROUTE_END : ROUTE_MORE;
	}
	if (s->rest)
		return ROUTE_MORE;
	if ((cls & RC_SLASH) && !s->raw) {
		route_segment_done(s);
		if (++s->seg >= ROUTE_MAX_SEGMENTS) {
			s->h = route_mix(s->h, ROUTE_REST_TOKEN);
			s->rest = 1;
		}
		return ROUTE_MORE;
	}
	s->sh = (s->sh ^ c) * ROUTE_MUL;
	s->and &= cls;
	s->or |= cls;
	if (s->len < 36)
		s->uuid_bad |= !(cls & ((ROUTE_UUID_DASHES >> s->len) & 1 ? RC_DASH : RC_HEX));
	s->len++;
	return ROUTE_MORE;
}

/* Eight bytes of the path (w, little-endian): ROUTE_MORE, or what byte s->at said. A global
 * function: the verifier checks it once, with s unknown, so the loop over the path costs it one
 * short path per word (that loop over the byte logic inlined made the states it walks grow past
 * its bound). Per word, not per byte: a call per byte cost l7_send ~250 ns more than the raw-path
 * key; per word no difference was measurable (bench/RESULTS.md, ID-bearing paths). */
__attribute__((noinline)) int l7_route_word(struct route_scan *s, __u64 w)
{
	int r;

	if (!s)
		return ROUTE_REFUSE;
#pragma unroll
	for (int j = 0; j < 8; j++) {
		r = route_byte(s, (w >> (8 * j)) & 0xff);
		if (r != ROUTE_MORE) {
			s->at = j;
			return r;
		}
	}
	return ROUTE_MORE;
}

/* The key of a request for summing: method and route template hashed; 0 if it is not to be
 * summed (see above; also CONNECT, and methods we do not know). A target that is not a path
 * ("*", absolute-form) is hashed whole: the same bytes always give the same route. Bytes past n
 * are zero. A global function: verified once, on its own, not in every caller. */
__attribute__((noinline)) __u64 l7_route_hash(const struct route_line *line, __u32 n, __u32 method)
{
	struct route_scan s = { .sh = ROUTE_SEED, .and = 0xff };
	__u32 start, i, k;
	__u64 v;
	int r;

	if (!line)
		return 0;
	switch (method) {
	case KSCOPE_HTTP_GET:
	case KSCOPE_HTTP_PUT:
		start = 4;
		break;
	case KSCOPE_HTTP_HEAD:
	case KSCOPE_HTTP_POST:
		start = 5;
		break;
	case KSCOPE_HTTP_PATCH:
	case KSCOPE_HTTP_TRACE:
		start = 6;
		break;
	case KSCOPE_HTTP_DELETE:
		start = 7;
		break;
	case KSCOPE_HTTP_OPTIONS:
		start = 8;
		break;
	default:
		return 0;
	}
	if (n > KSCOPE_L7_SUMMARY_HEAD)
		n = KSCOPE_L7_SUMMARY_HEAD;
	s.h = route_mix(ROUTE_SEED, method);
	s.raw = line->b[start] != '/';
	if (!s.raw)
		start++; /* the leading '/' is not part of the first segment */
	for (k = 0; k < KSCOPE_L7_SUMMARY_HEAD / 8; k++) {
		i = start + k * 8;
		/* a word read from here stays in the head (i + 8 <= 128); an end past here leaves no
		 * room for the version anyway */
		if (i >= n || i > KSCOPE_L7_SUMMARY_HEAD - ROUTE_VERSION_TAIL)
			return 0;
		/* bytes past n may be any (a longer earlier head): a key is only ever made of bytes
		 * before an end below n, and the version after it must be below n too */
		r = l7_route_word(&s, *(const __u64 *)&line->b[i]);
		if (r == ROUTE_MORE)
			continue;
		if (r != ROUTE_END)
			return 0;
		i += s.at & 7;
		/* the version must be captured too, for user space to read the line (and be one it
		 * reads: else it drops the summary, with every request in it) */
		if (i + ROUTE_VERSION_TAIL > n)
			return 0;
		barrier_var(i); /* clang drops this bound (n <= 128 implies it); the verifier needs it */
		if (i > KSCOPE_L7_SUMMARY_HEAD - ROUTE_VERSION_TAIL)
			return 0;
		v = *(const __u64 *)&line->b[i + 1];
		if ((v != HTTP_1_1 && v != HTTP_1_0) ||
		    (line->b[i + ROUTE_VERSION_TAIL - 1] != '\r' && line->b[i + ROUTE_VERSION_TAIL - 1] != '\n'))
			return 0;
		return s.h;
	}
	return 0; /* no end in the bytes a summary keeps */
}

#endif /* KSCOPE_L7_ROUTE_H */
