"""An explicit stand-in for the ``qt`` calls SemiSegLAWidget makes, plus the CTK/MRML widgets of its .ui file.

Not PythonQt: only what the widget calls exists (anything else raises AttributeError). Properties are
attributes (``button.text``, ``combo.currentIndex``, ``spinBox.value``), as PythonQt exposes Qt properties;
``connect("signal(args)", slot)`` connects a slot; a signal is emitted only where Qt emits it. There is no
event loop: ``EVENT_LOOP.run(until)`` fires the started timers and the queued ``singleShot`` calls (what
Qt's loop would do while the user waits), and ``slicer.app.processEvents()`` runs the queued calls only.
"""

import inspect
import os
import time
import xml.etree.ElementTree as ET
from typing import Callable, Dict, List, Optional


class _EventLoop:
    """The test-driven stand-in for QCoreApplication's loop: started QTimers and zero-delay single shots."""

    def __init__(self) -> None:
        self.timers: List[QTimer] = []
        self.queued: List[Callable[[], None]] = []

    def reset(self) -> None:
        self.timers.clear()
        self.queued.clear()

    def processEvents(self) -> None:
        queued, self.queued = self.queued, []
        for call in queued:
            call()

    def tick(self) -> None:
        """One turn of the loop: every started timer times out once, then the queued calls run."""
        for timer in [t for t in self.timers if t.isActive()]:
            if timer.isActive():  # an earlier slot may have stopped it
                timer._emit("timeout()")
        self.processEvents()

    def run(self, until: Callable[[], bool], timeout: float = 60.0, interval: float = 0.01) -> None:
        deadline = time.monotonic() + timeout
        while not until():
            if time.monotonic() > deadline:
                raise TimeoutError("fake qt: the condition did not come true while the event loop ran")
            self.tick()
            time.sleep(interval)


EVENT_LOOP = _EventLoop()


def _call(slot: Callable, args: tuple) -> None:
    # PythonQtSignalTarget::call: a slot taking fewer arguments than the signal gets the first ones only
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return slot(*args)
    if any(p.kind is p.VAR_POSITIONAL for p in parameters):
        return slot(*args)
    return slot(*args[:sum(1 for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))])


class _SignalsMixin:
    """QObject::connect with PythonQt's string signatures; ``_emit`` is where the Qt class emits."""

    def connect(self, signal: str, slot: Callable) -> None:
        self.__dict__.setdefault("_slots", {}).setdefault(signal, []).append(slot)

    def _emit(self, signal: str, *args) -> None:
        for slot in list(self.__dict__.get("_slots", {}).get(signal, [])):
            _call(slot, args)


class Qt:
    """The Qt namespace enums the widget uses (values as in qnamespace.h)."""
    Unchecked, Checked = 0, 2
    ItemIsEnabled, ItemIsUserCheckable = 32, 16
    ToolTipRole, UserRole = 3, 256


class QTimer(_SignalsMixin):
    """QTimer: start/stop/isActive/setInterval; timeout() fires only while started (on EVENT_LOOP.tick)."""

    def __init__(self) -> None:
        self.interval = 0
        self._active = False
        EVENT_LOOP.timers.append(self)

    def setInterval(self, msec: int) -> None:
        self.interval = msec

    def start(self) -> None:
        self._active = True

    def stop(self) -> None:
        self._active = False

    def isActive(self) -> bool:
        return self._active

    @staticmethod
    def singleShot(msec: int, call: Callable[[], None]) -> None:
        # QTimer::singleShot(0, f): f runs from the event loop after the current slot returns
        EVENT_LOOP.queued.append(call)


class QSettings:
    """QSettings value/setValue; one store per test (reset with the fake), values come back as stored."""
    store: Dict[str, object] = {}

    def value(self, key: str, default=None):
        return self.store.get(key, default)

    def setValue(self, key: str, value) -> None:
        self.store[key] = value


class QWidget(_SignalsMixin):
    """QWidget's enabled/toolTip properties and setStyleSheet."""

    def __init__(self) -> None:
        self.enabled = True
        self.toolTip = ""
        self.styleSheet = ""

    def setStyleSheet(self, text: str) -> None:
        self.styleSheet = text


class QLabel(QWidget):
    """QLabel: the text property."""

    def __init__(self) -> None:
        super().__init__()
        self.text = ""


class QPushButton(QLabel):
    """QAbstractButton: text/enabled; click() emits clicked(bool) only when enabled (a disabled button ignores it)."""

    def click(self) -> None:
        if self.enabled:
            self._emit("clicked(bool)", False)


class QCheckBox(QWidget):
    """QCheckBox: setting ``checked`` to a new value emits toggled(bool)."""

    def __init__(self) -> None:
        super().__init__()
        self._checked = False
        self.text = ""

    @property
    def checked(self) -> bool:
        return self._checked

    @checked.setter
    def checked(self, value: bool) -> None:
        if bool(value) != self._checked:
            self._checked = bool(value)
            self._emit("toggled(bool)", self._checked)


class QSpinBox(QWidget):
    """QSpinBox/QDoubleSpinBox: ``value`` clamped to [minimum, maximum]; a change emits valueChanged."""
    _type: type = int

    def __init__(self) -> None:
        super().__init__()
        self.minimum, self.maximum, self._value = 0, 99, 0

    @property
    def value(self):
        return self._value

    @value.setter
    def value(self, value) -> None:
        value = self._type(min(max(value, self.minimum), self.maximum))
        if value != self._value:
            self._value = value
            self._emit(f"valueChanged({self._type.__name__.replace('float', 'double')})", value)


class QDoubleSpinBox(QSpinBox):
    _type = float


class QLineEdit(QLabel):
    """QLineEdit: the text property."""


class QProgressBar(QWidget):
    """QProgressBar: value and setFormat."""

    def __init__(self) -> None:
        super().__init__()
        self.value = 0
        self.format = "%p%"

    def setFormat(self, text: str) -> None:
        self.format = text


class QPlainTextEdit(QWidget):
    """QPlainTextEdit: appendPlainText adds a line; maximumBlockCount drops the oldest lines; clear()."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: List[str] = []
        self.maximumBlockCount = 0

    def setMaximumBlockCount(self, count: int) -> None:
        self.maximumBlockCount = count

    def appendPlainText(self, text: str) -> None:
        self.lines.extend(str(text).split("\n"))
        if self.maximumBlockCount > 0:
            del self.lines[:-self.maximumBlockCount]

    def clear(self) -> None:
        self.lines = []

    def toPlainText(self) -> str:
        return "\n".join(self.lines)


class _StandardItem:
    """QStandardItem of a combo's model: setEnabled/isEnabled."""

    def __init__(self) -> None:
        self._enabled = True

    def setEnabled(self, enabled: bool) -> None:
        self._enabled = bool(enabled)

    def isEnabled(self) -> bool:
        return self._enabled


class _ComboModel:
    def __init__(self, combo: "QComboBox") -> None:
        self.combo = combo

    def item(self, row: int):
        return self.combo._items[row]["item"] if 0 <= row < len(self.combo._items) else None


class QComboBox(QWidget):
    """QComboBox: addItem selects the first item added to an empty combo, clear() goes to -1; every change
    of currentIndex emits currentIndexChanged(int); currentData is the current item's UserRole data."""

    def __init__(self) -> None:
        super().__init__()
        self._items: List[dict] = []
        self._index = -1

    def _setIndex(self, index: int) -> None:
        if index != self._index:
            self._index = index
            self._emit("currentIndexChanged(int)", index)

    @property
    def currentIndex(self) -> int:
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self._setIndex(index if 0 <= index < len(self._items) else -1)

    @property
    def count(self) -> int:
        return len(self._items)

    @property
    def currentData(self):
        return self.itemData(self._index)

    @property
    def currentText(self) -> str:
        return self._items[self._index]["text"] if self._index >= 0 else ""

    def addItem(self, text: str, data=None) -> None:
        self._items.append({"text": text, Qt.UserRole: data, "item": _StandardItem()})
        if self._index < 0:
            self._setIndex(0)

    def clear(self) -> None:
        self._items = []
        self._setIndex(-1)

    def itemData(self, index: int, role: int = Qt.UserRole):
        return self._items[index].get(role) if 0 <= index < len(self._items) else None

    def setItemData(self, index: int, value, role: int = Qt.UserRole) -> None:
        self._items[index][role] = value

    def findData(self, data) -> int:
        for index, item in enumerate(self._items):
            if item[Qt.UserRole] == data:
                return index
        return -1

    def itemText(self, index: int) -> str:
        return self._items[index]["text"]

    def model(self) -> _ComboModel:
        return _ComboModel(self)


class QTableWidgetItem:
    """QTableWidgetItem: text/flags/checkState/data/toolTip; a change to an item in a table makes the table
    emit itemChanged(QTableWidgetItem*) (QTableModel::itemChanged -> dataChanged)."""

    def __init__(self, text: str = "") -> None:
        self._text, self._flags, self._check, self._data, self._toolTip = str(text), None, None, {}, ""
        self._table: Optional[QTableWidget] = None
        self._column = -1

    def _changed(self) -> None:
        if self._table is not None:
            self._table._emit("itemChanged(QTableWidgetItem*)", self)

    def text(self) -> str:
        return self._text

    def column(self) -> int:
        return self._column

    def setFlags(self, flags: int) -> None:
        self._flags = flags
        self._changed()

    def flags(self) -> int:
        return self._flags

    def setCheckState(self, state: int) -> None:
        self._check = state
        self._changed()

    def checkState(self) -> int:
        return self._check if self._check is not None else Qt.Unchecked

    def setData(self, role: int, value) -> None:
        self._data[role] = value
        self._changed()

    def data(self, role: int):
        return self._data.get(role)

    def setToolTip(self, text: str) -> None:
        self._toolTip = text
        self._changed()


class _HeaderView:
    def setStretchLastSection(self, stretch: bool) -> None:
        self.stretchLastSection = stretch


class QTableWidget(QWidget):
    """QTableWidget: rows of items and cell widgets; setItem emits itemChanged, clearContents keeps the rows."""

    def __init__(self) -> None:
        super().__init__()
        self._rows, self._columns = 0, 0
        self._items: Dict[tuple, QTableWidgetItem] = {}
        self._widgets: Dict[tuple, QWidget] = {}
        self.headerLabels: List[str] = []
        self._header = _HeaderView()

    def setColumnCount(self, count: int) -> None:
        self._columns = count

    def columnCount(self) -> int:
        return self._columns

    def setHorizontalHeaderLabels(self, labels) -> None:
        self.headerLabels = list(labels)

    def horizontalHeader(self) -> _HeaderView:
        return self._header

    def setRowCount(self, count: int) -> None:
        self._rows = count
        for store in (self._items, self._widgets):
            for key in [k for k in store if k[0] >= count]:
                del store[key]

    def rowCount(self) -> int:
        return self._rows

    def clearContents(self) -> None:
        self._items.clear()
        self._widgets.clear()

    def setItem(self, row: int, column: int, item: QTableWidgetItem) -> None:
        if not (0 <= row < self._rows and 0 <= column < self._columns):
            return  # Qt ignores (and deletes) an item outside the table
        item._table, item._column = self, column
        self._items[(row, column)] = item
        item._changed()

    def item(self, row: int, column: int) -> Optional[QTableWidgetItem]:
        return self._items.get((row, column))

    def setCellWidget(self, row: int, column: int, widget: QWidget) -> None:
        self._widgets[(row, column)] = widget

    def cellWidget(self, row: int, column: int) -> Optional[QWidget]:
        return self._widgets.get((row, column))

    def resizeColumnsToContents(self) -> None:
        pass


# -- the CTK and MRML widgets of SemiSegLA.ui (slicer.qMRML..., ctk.ctk...) ----------------------------------
class ctkCollapsibleButton(QLabel):
    """ctkCollapsibleButton: changing ``collapsed`` emits contentsCollapsed(bool)."""

    def __init__(self) -> None:
        super().__init__()
        self._collapsed = False

    @property
    def collapsed(self) -> bool:
        return self._collapsed

    @collapsed.setter
    def collapsed(self, value: bool) -> None:
        if bool(value) != self._collapsed:
            self._collapsed = bool(value)
            self._emit("contentsCollapsed(bool)", self._collapsed)


class qMRMLNodeComboBox(QWidget):
    """qMRMLNodeComboBox: setCurrentNode emits currentNodeChanged(vtkMRMLNode*) on a change; a node removed
    from the scene is no longer current (the combo drops it, and emits)."""

    def __init__(self) -> None:
        super().__init__()
        self._node = None
        self.mrmlScene = None

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene

    def currentNode(self):
        if self._node is not None and self._node.GetScene() is None:
            self.setCurrentNode(None)
        return self._node

    def setCurrentNode(self, node) -> None:
        if node is not self._node:
            self._node = node
            self._emit("currentNodeChanged(vtkMRMLNode*)", node)


class qMRMLSegmentationShow3DButton(QPushButton):
    """qMRMLSegmentationShow3DButton: the segmentation it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.segmentationNode = None

    def setSegmentationNode(self, node) -> None:
        self.segmentationNode = node


class qMRMLWidget(QWidget):
    """qMRMLWidget: setMRMLScene emits mrmlSceneChanged(vtkMRMLScene*) (the .ui connects it to its selectors)."""

    def setMRMLScene(self, scene) -> None:
        self.mrmlScene = scene
        self._emit("mrmlSceneChanged(vtkMRMLScene*)", scene)


WIDGET_CLASSES = {cls.__name__: cls for cls in (
    QLabel, QPushButton, QCheckBox, QSpinBox, QDoubleSpinBox, QLineEdit, QProgressBar, QPlainTextEdit,
    QComboBox, QTableWidget, ctkCollapsibleButton, qMRMLNodeComboBox, qMRMLSegmentationShow3DButton, qMRMLWidget)}
_PROPERTIES = {"text", "toolTip", "checked", "collapsed", "minimum", "maximum", "value", "enabled"}


def _propertyValue(element: ET.Element):
    value = element[0]
    if value.tag == "bool":
        return value.text == "true"
    if value.tag == "number":
        return int(value.text)
    if value.tag == "double":
        return float(value.text)
    return value.text or ""


def loadUI(path: str) -> qMRMLWidget:
    """slicer.util.loadUI: the top widget of a Qt Designer file; each named child is created with the
    properties the widget reads back (text, checked, ranges, values, combo items) and the .ui's connections."""
    if not os.path.isfile(path):
        raise RuntimeError(f"Could not load UI file: {path}")
    root = ET.parse(path).getroot()
    top = root.find("widget")
    children: Dict[str, QWidget] = {}

    def build(element: ET.Element) -> QWidget:
        className = element.get("class")
        if className not in WIDGET_CLASSES:
            raise AttributeError(f"fake qt: widget class {className} is not part of the stand-in")
        widget = WIDGET_CLASSES[className]()
        widget.objectName = element.get("name")
        for prop in element.findall("property"):  # minimum before value: set in file order, as uic does
            if prop.get("name") in _PROPERTIES:
                setattr(widget, prop.get("name"), _propertyValue(prop))
        for item in element.findall("item"):
            if isinstance(widget, QComboBox):
                widget.addItem(_propertyValue(item.find("property")))
        return widget

    topWidget = build(top)
    for element in top.iter("widget"):
        if element is not top:
            children[element.get("name")] = build(element)
    topWidget.children = children
    everything = dict(children, **{top.get("name"): topWidget})
    for connection in root.iter("connection"):
        sender, receiver = everything[connection.findtext("sender")], everything[connection.findtext("receiver")]
        slot = connection.findtext("slot").split("(")[0]
        sender.connect(connection.findtext("signal"), getattr(receiver, slot))
    return topWidget


def childWidgetVariables(widget: qMRMLWidget):
    """slicer.util.childWidgetVariables: an object with one attribute per named child widget."""
    class _Ui:
        pass
    ui = _Ui()
    for name, child in widget.children.items():
        setattr(ui, name, child)
    return ui


class FakeLayout:
    """QVBoxLayout.addWidget of the module panel."""

    def __init__(self) -> None:
        self.widgets: List[QWidget] = []

    def addWidget(self, widget: QWidget) -> None:
        self.widgets.append(widget)


class FakeModulePanel:
    """The qSlicerScriptedLoadableModuleWidget a scripted widget draws into: layout() and isEntered."""

    def __init__(self) -> None:
        self._layout = FakeLayout()
        self.isEntered = False

    def layout(self) -> FakeLayout:
        return self._layout


def buildModule(moduleType):
    """Fill a ``qt`` module with exactly these names."""
    module = moduleType("qt")
    for name in ("Qt", "QTimer", "QSettings", "QComboBox", "QTableWidgetItem"):
        setattr(module, name, globals()[name])
    return module


def reset() -> None:
    EVENT_LOOP.reset()
    QSettings.store = {}
