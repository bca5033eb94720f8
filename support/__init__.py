"""The support package: everything a student may skip on a first reading (see README.md here).

The primer (model.py, aligner.py, data.py, generate.py, train.py) imports from these modules by
name; nothing here is needed to understand the Aligner. Not run on its own.
Read next: README.md in this folder, for a map of the modules.
"""
