"""The run configuration: its schema (`configs.schema`) and the error types every layer raises
(`configs.errors`), beside the example TOML files in this folder.

The bottom of the import graph: launch -> trainer -> data, models -> configs. Nothing here
imports any of the project's other packages.
"""
