"""`python -m converters --src=CHECKPOINT --dst=DIR`; exit code 2 and one line on failure."""

import argparse
import sys

import converters
from converters.errors import ConversionError


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
    prog="python -m converters",
    description="Convert an official PyTorch checkpoint for panda_jax.generators.load.",
  )
  parser.add_argument(
    "--src", required=True, help="network pickle, .pth/.bin/.tar file or checkpoint folder"
  )
  parser.add_argument("--dst", required=True, help="output directory (must not exist)")
  parser.add_argument(
    "--nz",
    type=int,
    default=None,
    help="DCGAN only: the latent size the weights must take (checked)",
  )
  args = parser.parse_args(argv)
  try:
    dst = converters.convert_file(args.src, args.dst, nz=args.nz)
  except ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except OSError as e:  # Reading errors are ConversionErrors: this is the output.
    print(
      f"error: {ConversionError(f'cannot write --dst={args.dst}: {e.strerror or e}')}",
      file=sys.stderr,
    )
    return 2
  except Exception as e:  # pylint: disable=broad-except
    # A bug, not the user's input: still one line and no traceback.
    print(
      f"error: internal error: {ConversionError(f'{type(e).__name__}: {e}')} "
      "(a converter bug; please report it with the file)",
      file=sys.stderr,
    )
    return 2
  print(dst)
  return 0


if __name__ == "__main__":
  sys.exit(main())
