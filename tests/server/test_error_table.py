"""server/api/errors.py's table: every domain error of the engine and the registry has one HTTP status and type, and
none of them carries HTTP itself."""
import inspect

import pytest

import server.engine.errors as engine_errors
import server.registry.store as registry_store
from server.api.errors import DOMAIN_ERRORS, error_mapping

DOMAIN_MODULES = (engine_errors, registry_store)


def _domain_errors() -> list[type[Exception]]:
    return [cls for module in DOMAIN_MODULES for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, Exception) and cls.__module__ == module.__name__]


@pytest.mark.parametrize("cls", _domain_errors(), ids=lambda cls: cls.__name__)
def test_every_domain_error_is_in_the_table_and_knows_no_http(cls):
    assert cls in DOMAIN_ERRORS
    assert not hasattr(cls, "status_code") and not hasattr(cls, "error_type")


def test_registry_unavailable_is_one_class_with_one_answer():
    unavailable = [cls for cls, mapping in DOMAIN_ERRORS.items() if mapping.error_type == "unavailable"]
    assert unavailable == [registry_store.RegistryUnavailableError]
    assert error_mapping(registry_store.RegistryUnavailableError("x")).status_code == 503


def test_a_subclass_answers_as_its_parent_and_a_stranger_is_refused():
    class Later(engine_errors.InvalidAdapterError):
        pass

    assert error_mapping(Later("x")) == DOMAIN_ERRORS[engine_errors.InvalidAdapterError]
    with pytest.raises(TypeError):
        error_mapping(ValueError("x"))
