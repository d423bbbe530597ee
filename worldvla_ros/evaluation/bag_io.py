"""rosbag2 (sqlite3 and mcap) reading and writing with ``rosbags``, our messages included."""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

REPO = Path(__file__).resolve().parents[2]
IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
STRING = 'std_msgs/msg/String'
EE_COMMAND = 'worldvla/msg/EndEffectorCommand'
ACTION_CHUNK = 'worldvla/msg/ActionChunk'
TWIST = 'geometry_msgs/msg/TwistStamped'
FLOAT_ARRAY = 'std_msgs/msg/Float64MultiArray'
STORAGES = {'sqlite3': StoragePlugin.SQLITE3, 'mcap': StoragePlugin.MCAP}


class BagError(RuntimeError):
    """A bag that cannot be evaluated: missing, corrupt, or lacking what the evaluation needs."""


def _msg_dirs() -> Iterator[Path]:
    prefixes = [p for p in os.environ.get('AMENT_PREFIX_PATH', '').split(os.pathsep) if p] + [sys.prefix]
    for prefix in prefixes:
        yield Path(prefix) / 'share' / 'worldvla' / 'msg'
    yield REPO / 'msg'


@cache
def typestore() -> Typestore:
    """Kilted's message types plus worldvla/msg/*, from the installed (or source) .msg files."""
    store = get_typestore(Stores.ROS2_KILTED)
    for folder in _msg_dirs():
        files = sorted(folder.glob('*.msg'))
        if files:
            types: dict[str, Any] = {}
            for f in files:
                types.update(get_types_from_msg(f.read_text(), f'worldvla/msg/{f.stem}'))
            store.register(types)
            return store
    raise BagError('worldvla .msg definitions not found (neither installed nor in the source tree)')


def stamp_ns(stamp: Any) -> int:
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)


def to_stamp(ns: int) -> Any:
    Time = typestore().types['builtin_interfaces/msg/Time']  # noqa: N806
    return Time(sec=int(ns // 1_000_000_000), nanosec=int(ns % 1_000_000_000))


@dataclass
class BagMessage:
    topic: str
    msgtype: str
    time_ns: int  # when the recorder received it
    msg: Any


class BagReader:
    """An open bag; every failure of ``rosbags`` becomes a ``BagError`` naming the bag."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        _check_bag_path(self.path)
        try:
            self._reader = Reader(self.path)
            self._reader.open()
        except Exception as exc:
            text = str(exc)
            if 'Serialization format' in text:
                raise BagError(f'{self.path}: {text.removesuffix(".")}: only CDR, the ROS 2 serialization, '
                               'can be read') from exc
            raise BagError(f'{self.path}: cannot open bag (truncated or corrupt?): {exc}') from exc
        self.topics: dict[str, str] = {c.topic: c.msgtype for c in self._reader.connections}
        self.counts: dict[str, int] = {}
        for c in self._reader.connections:
            self.counts[c.topic] = self.counts.get(c.topic, 0) + c.msgcount

    def __enter__(self) -> BagReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._reader.close()

    def topics_of_type(self, *msgtypes: str) -> list[str]:
        return [t for t, m in self.topics.items() if m in msgtypes]

    def messages(self, topics: Iterable[str]) -> Iterator[BagMessage]:
        wanted = set(topics)
        conns = [c for c in self._reader.connections if c.topic in wanted]
        store = typestore()
        try:
            for conn, t, raw in self._reader.messages(connections=conns):
                yield BagMessage(conn.topic, conn.msgtype, int(t), store.deserialize_cdr(raw, conn.msgtype))
        except BagError:
            raise
        except Exception as exc:
            raise BagError(f'{self.path}: bag is truncated or corrupt ({type(exc).__name__}: {exc})') from exc

    def raw_messages(self, topics: Iterable[str]) -> Iterator[tuple[str, str, int, bytes]]:
        wanted = set(topics)
        conns = [c for c in self._reader.connections if c.topic in wanted]
        try:
            for conn, t, raw in self._reader.messages(connections=conns):
                yield conn.topic, conn.msgtype, int(t), bytes(raw)
        except Exception as exc:
            raise BagError(f'{self.path}: bag is truncated or corrupt ({type(exc).__name__}: {exc})') from exc


def _check_bag_path(path: Path) -> None:
    """A rosbag2 bag is a directory with metadata.yaml (or a single .mcap file): say what else it is."""
    if not path.exists():
        raise BagError(f'{path}: no such bag')
    if path.is_file():
        if path.suffix == '.mcap':
            return
        raise BagError(f'{path}: is a file; a rosbag2 bag is a directory (metadata.yaml and its data files) '
                       'or a single .mcap file')
    if not path.is_dir():
        raise BagError(f'{path}: neither a directory nor a file')
    if not (path / 'metadata.yaml').is_file():
        data = sorted(p.name for p in path.iterdir() if p.suffix in ('.mcap', '.db3'))
        if data:
            raise BagError(f'{path}: no metadata.yaml beside {", ".join(data[:3])}: a recording that was stopped '
                           'before it finished? `ros2 bag reindex` rebuilds it (an .mcap file can also be given '
                           'directly)')
        raise BagError(f'{path}: not a rosbag2 bag (no metadata.yaml)')


class BagWriter:
    """Writes messages (rosbags objects or CDR bytes) to a new rosbag2 directory."""

    def __init__(self, path: str | Path, storage: str = 'mcap') -> None:
        if storage not in STORAGES:
            raise ValueError(f'storage must be one of {", ".join(STORAGES)}')
        self.path = Path(path)
        if self.path.exists():
            raise FileExistsError(f'{self.path} exists; rosbag2 writes a new directory')
        self._writer = Writer(self.path, version=9, storage_plugin=STORAGES[storage])
        self._writer.open()
        self._connections: dict[str, Any] = {}

    def __enter__(self) -> BagWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._writer.close()

    def _connection(self, topic: str, msgtype: str) -> Any:
        conn = self._connections.get(topic)
        if conn is None:
            conn = self._writer.add_connection(topic, msgtype, typestore=typestore())
            self._connections[topic] = conn
        return conn

    def write(self, topic: str, msgtype: str, time_ns: int, msg: Any) -> None:
        self._writer.write(self._connection(topic, msgtype), int(time_ns), typestore().serialize_cdr(msg, msgtype))

    def write_raw(self, topic: str, msgtype: str, time_ns: int, data: bytes) -> None:
        self._writer.write(self._connection(topic, msgtype), int(time_ns), data)


# -- message builders (rosbags types) ------------------------------------------------------
def header(ns: int, frame_id: str = '') -> Any:
    return typestore().types['std_msgs/msg/Header'](stamp=to_stamp(ns), frame_id=frame_id)


def image_msg(rgb: np.ndarray, ns: int, frame_id: str = 'camera') -> Any:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    return typestore().types[IMAGE](header=header(ns, frame_id), height=h, width=w, encoding='rgb8',
                                    is_bigendian=0, step=w * 3, data=rgb.reshape(-1))


def compressed_image_msg(rgb: np.ndarray, ns: int, fmt: str = 'png', frame_id: str = 'camera') -> Any:
    """A CompressedImage as image_transport's compressed plugin writes it (format 'rgb8; png compressed bgr8')."""
    import cv2

    ok, data = cv2.imencode(f'.{fmt}', np.ascontiguousarray(rgb, dtype=np.uint8)[:, :, ::-1])
    if not ok:
        raise ValueError(f'cannot encode a frame as {fmt}')
    return typestore().types[COMPRESSED](header=header(ns, frame_id), format=f'rgb8; {fmt} compressed bgr8',
                                         data=data.reshape(-1))


def string_msg(text: str) -> Any:
    return typestore().types[STRING](data=text)


def ee_command_msg(action: np.ndarray, ns: int, index: int = 0, chunk_size: int = 1, sequence: int = 0) -> Any:
    return typestore().types[EE_COMMAND](
        header=header(ns, 'ee_delta'), action=np.asarray(action, dtype=np.float64).reshape(7), index=index,
        chunk_size=chunk_size, chunk_sequence=sequence, hold=False, dry_run=False)
