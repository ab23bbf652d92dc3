"""Strict fakes for the parts of 3D Slicer that exist only inside the application (PythonQt's ``qt``,
``ctk``, ``slicer.ScriptedLoadableModule``, ``slicer.parameterNodeWrapper``, ``slicer.i18n``,
``slicer.app``, the Segment Editor's scripted-effect adaptor). Everything MRML is the real thing
(slicer-core). Any name not listed raises ``AttributeError("not faked: ...")``: a typo in the shell
fails here instead of passing silently as it would with MagicMock.

Each fake names the Slicer file it imitates; the contract test checks their surfaces against the
Slicer API manifest in ../shared/slicer-api. Install with :func:`install` in a separate process
(``test_slicer_shell.py`` does), never in the pytest process: the ``slicer`` package picks up
module names globally.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import unittest
from pathlib import Path


class Strict:
    """Attribute access limited to ``allowed``; reads of unset allowed names raise too."""

    def __init__(self, what: str, allowed, **values):
        object.__setattr__(self, "_what", what)
        object.__setattr__(self, "_allowed", set(allowed) | set(values))
        object.__setattr__(self, "_values", dict(values))

    def __getattr__(self, name):
        if name in self._values:
            return self._values[name]
        raise AttributeError(f"not faked: {self._what}.{name} - verify in Slicer source first")

    def __setattr__(self, name, value):
        if name not in self._allowed:
            raise AttributeError(f"not faked: {self._what}.{name} (set) - verify in Slicer source first")
        self._values[name] = value


def strict_module(name: str, **members) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(members)

    def __getattr__(attr):  # module-level __getattr__ (PEP 562): only for names not defined above
        raise AttributeError(f"not faked: {name}.{attr} - verify in Slicer source first")

    module.__getattr__ = __getattr__
    return module


# -- Base/Python/slicer/ScriptedLoadableModule.py ------------------------------------------------
MODULE_PARENT_ATTRIBUTES = ("title", "categories", "dependencies", "contributors", "helpText",
                            "acknowledgementText", "hidden", "icon", "index", "associatedNodeTypes", "extensions")


class ScriptedLoadableModule:
    def __init__(self, parent):
        self.parent = parent
        self.moduleName = type(self).__name__
        parent.title = ""
        parent.categories = []
        parent.dependencies = []
        parent.contributors = []
        parent.helpText = ""
        parent.acknowledgementText = ""


class ScriptedLoadableModuleLogic:
    """Reproduces the real singleton parameter node: a vtkMRMLScriptedModuleNode tagged ModuleName."""

    def __init__(self, parent=None):
        self.moduleName = type(self).__name__[: -len("Logic")]

    def getParameterNode(self):
        import slicer

        node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
            node.UnRegister(None)  # CreateNodeByClass returns an owned reference (as the real code does)
            node.SetSingletonTag(self.moduleName)
            node.SetAttribute("ModuleName", self.moduleName)
            node = slicer.mrmlScene.AddNode(node)
        return node


class ScriptedLoadableModuleWidget:  # never instantiated here (its setup needs Qt)
    def __init__(self, parent=None):
        raise AttributeError("not faked: ScriptedLoadableModuleWidget needs Qt - verify in Slicer")


DISPLAYED: list[str] = []  # what delayDisplay showed


class ScriptedLoadableModuleTest(unittest.TestCase):
    def delayDisplay(self, message, requestedDelay=None, msec=None):
        DISPLAYED.append(message)


# -- Base/Python/slicer/parameterNodeWrapper (the decorator stores typed values as node parameters) --
def parameterNodeWrapper(cls):
    import typing

    hints = typing.get_type_hints(cls, include_extras=True)
    defaults = {name: getattr(cls, name) for name in hints if hasattr(cls, name)}

    class Wrapped:
        """Values live in the node (strings as parameters, nodes as node references), as in Slicer."""

        __annotations__ = hints

        def __init__(self, node):
            object.__setattr__(self, "parameterNode", node)
            for name, value in defaults.items():
                if not node.GetParameter(name):
                    setattr(self, name, value)

        def __getattr__(self, name):
            if name not in hints:
                raise AttributeError(f"not faked: {cls.__name__} has no parameter {name}")
            node = object.__getattribute__(self, "parameterNode")
            if "vtkMRML" in str(hints[name]):
                return node.GetNodeReference(name)
            text = node.GetParameter(name)
            return Path(text) if "Path" in str(hints[name]) and text else (text or None)

        def __setattr__(self, name, value):
            if name not in hints:
                raise AttributeError(f"{cls.__name__} has no parameter {name}")
            choices = [a for a in getattr(hints[name], "__metadata__", ()) if isinstance(a, Choice)]
            if choices and value not in choices[0].choices:
                raise ValueError(f"{name}={value!r} is not one of {choices[0].choices}")
            node = object.__getattribute__(self, "parameterNode")
            if "vtkMRML" in str(hints[name]):
                node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                node.SetParameter(name, "" if value is None else str(value))

    Wrapped.__name__ = cls.__name__
    return Wrapped


class Choice:
    def __init__(self, choices):
        self.choices = list(choices)


# -- Modules/Loadable/Segmentations/EditorEffects (adaptor, factory, abstract effect) --------------
EFFECT_FACTORY: list = []


class AbstractScriptedSegmentEditorEffect:
    def __init__(self, scriptedEffect):
        self.scriptedEffect = scriptedEffect

    def register(self):
        EFFECT_FACTORY.append(self.scriptedEffect)


def scripted_effect(members) -> "ScriptedEffectAdaptor":
    return ScriptedEffectAdaptor(members)


class ScriptedEffectAdaptor(Strict):
    """qSlicerSegmentEditorScriptedEffect: setPythonSource loads <Name>.py and instantiates class <Name>
    with the adaptor; ``self()`` returns that Python object. Parameters are recorded."""

    MEMBERS: set = set()

    def __init__(self, parent=None):
        Strict.__init__(self, "scriptedEffect", self.MEMBERS | {"name", "perSegment", "requireSegments"},
                        parameters={}, defaults={})
        self._values["setPythonSource"] = self._set_source
        self._values["self"] = lambda: self._values["_instance"]
        self._values["setParameterDefault"] = lambda k, v: self._values["defaults"].__setitem__(k, v)
        self._values["parameter"] = lambda k: self._values["parameters"].get(k, self._values["defaults"].get(k, ""))
        self._values["setParameter"] = lambda k, v: self._values["parameters"].__setitem__(k, v)

    def _set_source(self, path):
        path = Path(path)
        spec = importlib.util.spec_from_file_location(path.parent.name + "." + path.stem, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        self._values["_instance"] = getattr(module, path.stem)(self)
        self._values["source"] = str(path)


# -- PythonQt qt / ctk: only what the shell touches outside Qt widgets -----------------------------
class QIcon:
    def __init__(self, path=None):
        self.path = path


class Qt:
    Checked, Unchecked = 2, 0


class _App(Strict):
    def __init__(self):
        Strict.__init__(self, "slicer.app", set(), connections=[], temporaryPath="/tmp")
        self._values["connect"] = lambda signal, slot: self._values["connections"].append((signal, slot))


def install(scene, effect_members) -> dict:
    """Put the fakes in ``sys.modules`` next to the real slicer-core ``slicer``; returns the recorders."""
    import slicer

    slicer.mrmlScene = scene
    slicer.app = _App()
    ScriptedEffectAdaptor.MEMBERS = set(effect_members)
    sys.modules["qt"] = strict_module("qt", QIcon=QIcon, Qt=Qt)
    sys.modules["ctk"] = strict_module("ctk")
    sys.modules["slicer.ScriptedLoadableModule"] = strict_module(
        "slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
        ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget,
        ScriptedLoadableModuleTest=ScriptedLoadableModuleTest)
    sys.modules["slicer.parameterNodeWrapper"] = strict_module(
        "slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper, Choice=Choice)
    sys.modules["slicer.i18n"] = strict_module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    slicer.i18n = sys.modules["slicer.i18n"]
    sys.modules["SegmentEditorEffects"] = strict_module(
        "SegmentEditorEffects", AbstractScriptedSegmentEditorEffect=AbstractScriptedSegmentEditorEffect)
    sys.modules["qSlicerSegmentationsEditorEffectsPythonQt"] = strict_module(
        "qSlicerSegmentationsEditorEffectsPythonQt", qSlicerSegmentEditorScriptedEffect=ScriptedEffectAdaptor)
    return {"app": slicer.app, "factory": EFFECT_FACTORY}


class ModuleParent(Strict):
    """The C++ qSlicerScriptedLoadableModule behind ``self.parent``: only its writable Q_PROPERTYs."""

    def __init__(self):
        Strict.__init__(self, "parent", MODULE_PARENT_ATTRIBUTES)
