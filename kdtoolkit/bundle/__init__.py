"""The hand-off bundle: ``make_bundle`` (make), ``verify_bundle`` (verify), the manifest model that
generates ``schemas/bundle-manifest.schema.json`` (manifest), the Triton entry (triton), the README and
on-device commands (readme), and reading a finished run (lineage). See docs/bundle.md."""

from kdtoolkit.bundle.common import (
                                     BUNDLE_SCHEMA,
                                     BUNDLE_SCHEMA_VERSION,
                                     DEPLOY_DIR,
                                     DEPLOY_SCRIPTS,
                                     MANIFEST,
                                     SCHEMA_FILE,
                                     TOLERANCE,
                                     layer_precision,
)
from kdtoolkit.bundle.lineage import find_final, lineage
from kdtoolkit.bundle.make import make_bundle
from kdtoolkit.bundle.readme import _build_script, on_device_commands
from kdtoolkit.bundle.verify import load_manifest, open_bundle, validate_manifest, verify_bundle

__all__ = ["BUNDLE_SCHEMA", "BUNDLE_SCHEMA_VERSION", "DEPLOY_DIR", "DEPLOY_SCRIPTS", "MANIFEST", "SCHEMA_FILE", "TOLERANCE", "_build_script",
           "find_final", "layer_precision", "lineage", "load_manifest", "make_bundle", "on_device_commands", "open_bundle",
           "validate_manifest", "verify_bundle"]
