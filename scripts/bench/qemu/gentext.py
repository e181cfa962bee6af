#!/usr/bin/env python3
"""gentext.py SIZE_BYTES SEED > out: the same bytes as Kimberley's guest
`fill text` (guest/src/gen.rs fill_text): words from a 32-word list chosen
5 bits at a time from SplitMix64(seed); each u64 gives one line of 12 words
(11 spaces and a newline), the last word cut at the end of the buffer."""
import sys

WORDS = [b"the", b"of", b"and", b"to", b"in", b"is", b"that", b"for", b"it", b"as", b"was", b"with",
         b"be", b"by", b"on", b"not", b"he", b"this", b"are", b"or", b"his", b"from", b"at", b"which",
         b"but", b"have", b"an", b"had", b"they", b"you", b"were", b"their"]
M = (1 << 64) - 1
# 3 words (15 bits) per table entry; the line's 4th triple ends in '\n'.
mid = [WORDS[i & 31] + b" " + WORDS[(i >> 5) & 31] + b" " + WORDS[i >> 10] + b" " for i in range(1 << 15)]
end = [WORDS[i & 31] + b" " + WORDS[(i >> 5) & 31] + b" " + WORDS[i >> 10] + b"\n" for i in range(1 << 15)]


def main():
    size, seed = int(sys.argv[1]), int(sys.argv[2])
    out = sys.stdout.buffer
    s = seed
    done = 0
    while done < size:
        parts = []
        for _ in range(4096):
            s = (s + 0x9E3779B97F4A7C15) & M
            z = s
            z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
            z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
            z ^= z >> 31
            parts.append(mid[z & 0x7FFF])
            parts.append(mid[(z >> 15) & 0x7FFF])
            parts.append(mid[(z >> 30) & 0x7FFF])
            parts.append(end[(z >> 45) & 0x7FFF])
        chunk = b"".join(parts)
        if done + len(chunk) > size:
            chunk = chunk[: size - done]
        out.write(chunk)
        done += len(chunk)


main()
