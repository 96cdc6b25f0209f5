"""The qcow2 format, split as QEMU splits it over one state: ``format.py`` (every magic, flag and struct),
``file.py`` (the image file's I/O and its metadata lock), ``cache.py`` (the table caches), ``tables.py`` (numpy
views of tables), ``refcount.py`` (refcounts, the allocator, frees), ``cluster.py`` (mapping, the write path,
zero/discard), ``compressed.py``, ``image.py`` (the node facade, open/create and the flush ordering) and
``check.py`` (check and repair)."""
