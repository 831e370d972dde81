# A package, so this folder's conftest.py and the root one do not both import as "conftest".
