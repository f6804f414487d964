"""dashcar's wire contract: frame kinds, encode/decode, limits and the layout's naming rules."""

from __future__ import annotations

from ._constants import ACKS_SOCKET as ACKS_SOCKET
from ._constants import AGENT_LOCK as AGENT_LOCK
from ._constants import CONTROL_SOCKET as CONTROL_SOCKET
from ._constants import FILE_INLINE_MAX_BYTES as FILE_INLINE_MAX_BYTES
from ._constants import HELLO_TOPIC as HELLO_TOPIC
from ._constants import INGEST_SOCKET as INGEST_SOCKET
from ._constants import LOG_LEVELS as LOG_LEVELS
from ._constants import MAX_FRAME_BYTES as MAX_FRAME_BYTES
from ._constants import PROTOCOL_MINOR as PROTOCOL_MINOR
from ._constants import PROTOCOL_VERSION as PROTOCOL_VERSION
from ._constants import SPAWN_LOCK as SPAWN_LOCK
from ._errors import ConfigError as ConfigError
from ._errors import DashcarError as DashcarError
from ._errors import DecodeError as DecodeError
from ._errors import FrameTooLarge as FrameTooLarge
from ._errors import InvalidName as InvalidName
from ._errors import ProtocolError as ProtocolError
from ._errors import UnsupportedVersion as UnsupportedVersion
from ._frames import RUN_STATUSES as RUN_STATUSES
from ._frames import FileCopy as FileCopy
from ._frames import FileDelete as FileDelete
from ._frames import FilePut as FilePut
from ._frames import FileUpdate as FileUpdate
from ._frames import Flush as Flush
from ._frames import Frame as Frame
from ._frames import Kind as Kind
from ._frames import Log as Log
from ._frames import Meta as Meta
from ._frames import Metric as Metric
from ._frames import Params as Params
from ._frames import ProducerGone as ProducerGone
from ._frames import RunClose as RunClose
from ._frames import RunOpen as RunOpen
from ._frames import Track as Track
from ._frames import check_record as check_record
from ._frames import coalesce as coalesce
from ._frames import decode as decode
from ._frames import decode_message as decode_message
from ._frames import encode as encode
from ._frames import frame_count as frame_count
from ._frames import frame_from as frame_from
from ._frames import frame_head as frame_head
from ._frames import internal_record as internal_record
from ._frames import message_ids as message_ids
from ._frames import refusal_reason as refusal_reason
from ._frames import unpack_stored as unpack_stored
from ._frames import validate as validate
from ._names import FILES_DIR as FILES_DIR
from ._names import FILES_INDEX as FILES_INDEX
from ._names import FILES_LOCK as FILES_LOCK
from ._names import SPOOL_DIR as SPOOL_DIR
from ._names import check_file_id as check_file_id
from ._names import check_file_name as check_file_name
from ._names import check_prefix as check_prefix
from ._names import check_root as check_root
from ._names import file_dir as file_dir
from ._names import file_dir_parts as file_dir_parts
from ._names import files_dir as files_dir
from ._names import metric_dir_parts as metric_dir_parts
from ._names import run_dir as run_dir
from ._names import split_name as split_name
from ._names import spool_dir as spool_dir
from ._names import stored_file_path as stored_file_path
from ._names import track_dir_name as track_dir_name
from ._ndarray import NDARRAY_MIN_SIZE as NDARRAY_MIN_SIZE
from ._ndarray import ndarray_ext as ndarray_ext
from ._paths import COUNTER as COUNTER
from ._paths import COUNTERS_DIR as COUNTERS_DIR
from ._paths import counter_path as counter_path
from ._paths import ensure_private_dir as ensure_private_dir
from ._paths import parse_counter_name as parse_counter_name
from ._paths import runtime_dir as runtime_dir
from ._paths import state_dir as state_dir

__all__ = [
    "ACKS_SOCKET",
    "AGENT_LOCK",
    "CONTROL_SOCKET",
    "COUNTER",
    "COUNTERS_DIR",
    "FILES_DIR",
    "FILES_INDEX",
    "FILES_LOCK",
    "FILE_INLINE_MAX_BYTES",
    "HELLO_TOPIC",
    "INGEST_SOCKET",
    "LOG_LEVELS",
    "MAX_FRAME_BYTES",
    "NDARRAY_MIN_SIZE",
    "PROTOCOL_MINOR",
    "PROTOCOL_VERSION",
    "RUN_STATUSES",
    "SPAWN_LOCK",
    "SPOOL_DIR",
    "ConfigError",
    "DashcarError",
    "DecodeError",
    "FileCopy",
    "FileDelete",
    "FilePut",
    "FileUpdate",
    "Flush",
    "Frame",
    "FrameTooLarge",
    "InvalidName",
    "Kind",
    "Log",
    "Meta",
    "Metric",
    "Params",
    "ProducerGone",
    "ProtocolError",
    "RunClose",
    "RunOpen",
    "Track",
    "UnsupportedVersion",
    "check_file_id",
    "check_file_name",
    "check_prefix",
    "check_record",
    "check_root",
    "coalesce",
    "counter_path",
    "decode",
    "decode_message",
    "encode",
    "ensure_private_dir",
    "file_dir",
    "file_dir_parts",
    "files_dir",
    "frame_count",
    "frame_from",
    "frame_head",
    "internal_record",
    "message_ids",
    "metric_dir_parts",
    "ndarray_ext",
    "parse_counter_name",
    "refusal_reason",
    "run_dir",
    "runtime_dir",
    "split_name",
    "spool_dir",
    "state_dir",
    "stored_file_path",
    "track_dir_name",
    "unpack_stored",
    "validate",
]
