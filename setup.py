"""setup.py for fairseq-knnlm: the metadata lives in pyproject.toml (PEP 621), read by
setuptools; this file keeps the classic entry points working:

    pip install .                 # or: pip install -e .   (see install.sh for the order)
    python setup.py --name        # fairseq-knnlm

Install torch first (a CPU or a CUDA build of your choice) and fairseq with
``--no-build-isolation``: install.sh does both; a bare ``torch`` requirement would pull a
multi-GB CUDA build on a CPU machine.
"""

from setuptools import setup

if __name__ == "__main__":
    setup()
