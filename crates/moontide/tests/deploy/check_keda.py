"""Validates the KEDA objects (apiVersion keda.sh/*) in YAML files against KEDA's CRD schema.

kubernetes-validate ships only Kubernetes' own schemas: for a custom resource it prints a
warning and passes. This checks KEDA's kinds with the pydantic models that the package
`cloudcoil.models.keda` generates from KEDA's CRDs (the version is pinned in
scripts/test-requirements.txt; the model version is KEDA's). A model ignores fields it does
not know, so each object must also come back unchanged from the model: a field the CRD does
not have, or a value of another type, is an error, as `kubectl apply`'s strict field
validation would make it.

Usage: check_keda.py FILE...   Prints `OK kind/name` per object checked; exit 1 on an error.
"""

import sys

import yaml
from importlib.metadata import version

import cloudcoil.models.keda.v1alpha1 as keda
import pydantic


def check(document):
    """Returns the errors of one KEDA object (empty: valid)."""
    api_version = document.get("apiVersion")
    if api_version != "keda.sh/v1alpha1":
        return [f"apiVersion {api_version!r}: only keda.sh/v1alpha1 is known"]
    model = getattr(keda, str(document.get("kind")), None)
    if model is None or not isinstance(model, type) or not issubclass(model, pydantic.BaseModel):
        return [f"kind {document.get('kind')!r} is not a KEDA kind"]
    try:
        parsed = model.model_validate(document)
    except pydantic.ValidationError as error:
        return [str(error)]
    again = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    return [f"not in KEDA's schema as written: {path}" for path in differences(document, again, "")]


def differences(given, kept, path):
    """Paths where `kept` (the model's dump) differs from `given` (the file)."""
    if isinstance(given, dict) and isinstance(kept, dict):
        out = []
        for key in given:
            if key not in kept:
                out.append(f"{path}.{key} (unknown field)")
            else:
                out.extend(differences(given[key], kept[key], f"{path}.{key}"))
        return out
    if isinstance(given, list) and isinstance(kept, list) and len(given) == len(kept):
        out = []
        for index, (a, b) in enumerate(zip(given, kept)):
            out.extend(differences(a, b, f"{path}[{index}]"))
        return out
    if given != kept or type(given) is not type(kept):
        return [f"{path}: {given!r} read as {kept!r}"]
    return []


def main(paths):
    print(f"cloudcoil.models.keda {version('cloudcoil.models.keda')}")
    failed = False
    for path in paths:
        with open(path) as file:
            documents = [d for d in yaml.safe_load_all(file) if d]
        for document in documents:
            if not str(document.get("apiVersion", "")).startswith("keda.sh/"):
                continue
            name = f"{str(document.get('kind')).lower()}/{document.get('metadata', {}).get('name')}"
            errors = check(document)
            if errors:
                failed = True
                for error in errors:
                    print(f"ERROR {path} {name}: {error}")
            else:
                print(f"OK {path} {name}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
