"""The bundle manifest model generates the committed JSON schema."""

from __future__ import annotations


def test_committed_schema_is_generated_from_the_manifest_model():
    from kdtoolkit.bundle.manifest import SCHEMA_FILE, schema_text

    assert SCHEMA_FILE.read_text() == schema_text(), "run `python -m kdtoolkit.bundle.manifest` and commit the schema"


def test_manifest_model_rejects_what_the_schema_rejects():
    import pytest
    from pydantic import ValidationError

    from kdtoolkit.bundle.manifest import BundleManifest, FileHash

    with pytest.raises(ValidationError):
        FileHash(sha256="nothex", size=1)
    with pytest.raises(ValidationError):
        BundleManifest.model_validate({"schema": "kdtoolkit.bundle/2", "schema_version": 1})
