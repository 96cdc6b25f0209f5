"""vdisk's tests.  A package so that pytest puts the project root on ``sys.path`` (its default "prepend" import
mode inserts the first directory above a test file that holds no ``__init__.py``): tests import their shared
helpers as ``tests.support`` and the fuzzing code as ``fuzz``, with no ``sys.path`` edits.
"""
