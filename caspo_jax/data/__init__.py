"""Datasets on grain: records, images, chat templates, constitutions, importers."""
