"""`python -m converters --src=CHECKPOINT --dst=DIR`; exit code 2 and one line on failure."""
import argparse
import sys

import converters
from converters.errors import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m converters",
      description="Convert an official PyTorch checkpoint for panda_jax.generators.load.")
  parser.add_argument("--src", required=True,
                      help="network pickle, .pth/.bin file or checkpoint folder")
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  args = parser.parse_args(argv)
  try:
    dst = converters.convert_file(args.src, args.dst)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  print(dst)
  return 0


if __name__ == "__main__":
  sys.exit(main())
