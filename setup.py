"""The one thing pyproject.toml cannot say: batcher._speedups, the WebDataset export's row
loop in C, built where a C compiler, Python's headers and SQLite's are (``optional``: where they are
not, the install goes on without it and the export runs its Python loop, which writes the
same bytes)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "batcher._speedups",
            sources=["batcher/_speedups.c"],
            libraries=["sqlite3"],  # it reads the job table through SQLite's C interface
            optional=True,
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-unused-parameter"],
        )
    ]
)
