"""Write a compressed, self-extracting copy of train_gpt.py: the challenge counts the shipped script's bytes
against the 16,000,000-byte cap, and records ship this one-line lzma + base85 wrapper instead of the plain source.

    python3 tools/pack_code.py [SRC=train_gpt.py] [-o OUT=packed/train_gpt.py]

The wrapper binds the source text to PACKED_SOURCE (train_gpt.py logs that instead of reading its own file when
the global exists) and execs it in the wrapper's own module globals, so `__file__` is the wrapper's path (a run
counts the wrapper's bytes) and `if __name__ == "__main__":` fires as usual. Prints the source and packed sizes.
"""
import argparse
import base64
import lzma
import sys
from pathlib import Path

PRESET = 9 | lzma.PRESET_EXTREME
WRAPPER = ('import lzma,base64;PACKED_SOURCE=lzma.decompress(base64.b85decode(b"{payload}")).decode();'
           'exec(compile(PACKED_SOURCE,__file__,"exec"))\n')


class PackError(ValueError):
    pass


def compress(source):
    """The smallest of the .xz and .lzma (LZMA1, a few literal/position settings) streams of `source`; plain
    lzma.decompress reads both formats."""
    candidates = [lzma.compress(source, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE, preset=PRESET)]
    # Source text compresses best with position bits 0 and some literal context; the best mix varies by file.
    candidates += [lzma.compress(source, format=lzma.FORMAT_ALONE,
                                 filters=[dict(id=lzma.FILTER_LZMA1, preset=PRESET, lc=lc, lp=0, pb=pb)])
                   for lc in range(5) for pb in range(3)]
    return min(candidates, key=len)


def pack(source):
    """The wrapper script (str) for the source bytes (UTF-8 Python)."""
    # base85 never emits a quote or a backslash, so the payload is a valid bytes literal as is.
    return WRAPPER.format(payload=base64.b85encode(compress(source)).decode("ascii"))


def pack_file(src, out):
    """Write the wrapper of `src` to `out`; returns (source bytes, packed bytes)."""
    src, out = Path(src), Path(out)
    if not src.is_file():
        raise PackError(f"{src} does not exist")
    if out.resolve() == src.resolve():
        raise PackError(f"the output {out} is the source itself")
    source = src.read_bytes()
    try:
        source.decode("utf-8")
    except UnicodeDecodeError:
        raise PackError(f"{src} is not UTF-8, which the wrapper decodes") from None
    packed = pack(source).encode("ascii")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(packed)
    return len(source), len(packed)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", nargs="?", default="train_gpt.py", help="source script (default train_gpt.py)")
    parser.add_argument("-o", "--output", default="packed/train_gpt.py", help="wrapper to write (default packed/train_gpt.py)")
    args = parser.parse_args(argv)
    try:
        n_source, n_packed = pack_file(args.src, args.output)
    except PackError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"{args.src}: {n_source} bytes -> {args.output}: {n_packed} bytes "
          f"(saves {n_source - n_packed} bytes, {100 * (1 - n_packed / n_source):.1f}%)")


if __name__ == "__main__":
    main()
