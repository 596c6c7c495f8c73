/*
 * The few libc-style helpers gcc may call even in freestanding code, plus
 * string parsing for the command line.  Built with
 * -fno-tree-loop-distribute-patterns so these loops are not turned back
 * into calls to themselves.
 */
#include "guest.h"

/* `rep stosb`: one instruction, cheap even where ring 0 is emulated. */
void *memset(void *d, int c, size_t n)
{
	void *p = d;
	__asm__ volatile("rep stosb" : "+D"(p), "+c"(n) : "a"(c) : "memory");
	return d;
}

void *memcpy(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	while (n--)
		*dp++ = *sp++;
	return d;
}

void *memmove(void *d, const void *s, size_t n)
{
	u8 *dp = d;
	const u8 *sp = s;
	if (dp < sp) {
		while (n--)
			*dp++ = *sp++;
	} else {
		while (n--)
			dp[n] = sp[n];
	}
	return d;
}

int memcmp(const void *a, const void *b, size_t n)
{
	const u8 *x = a, *y = b;
	for (size_t i = 0; i < n; i++)
		if (x[i] != y[i])
			return x[i] < y[i] ? -1 : 1;
	return 0;
}

size_t strlen(const char *s)
{
	size_t n = 0;
	while (s[n])
		n++;
	return n;
}

/* Does the (not NUL-terminated) a[0..alen) equal the C string b? */
bool str_eq_n(const char *a, size_t alen, const char *b)
{
	size_t blen = strlen(b);
	return alen == blen && memcmp(a, b, alen) == 0;
}

bool parse_u64(const char *s, size_t len, u64 *out)
{
	u64 v = 0;
	if (len == 0)
		return false;
	for (size_t i = 0; i < len; i++) {
		if (s[i] < '0' || s[i] > '9')
			return false;
		u64 d = (u64)(s[i] - '0');
		if (v > (~0ULL - d) / 10)
			return false;
		v = v * 10 + d;
	}
	*out = v;
	return true;
}
