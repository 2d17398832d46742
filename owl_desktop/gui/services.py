"""The app layer's objects the window works with, built once at start. Nothing in them knows Qt."""

from __future__ import annotations

from dataclasses import dataclass

from owl_desktop.app.chat_service import ChatService
from owl_desktop.app.settings import Settings, apply_data_dir
from owl_desktop.hub.manager import ModelManager
from owl_desktop.store.conversations import ConversationStore
from owl_desktop.store.images import ImageStore


@dataclass
class Services:
    settings: Settings
    store: ConversationStore
    images: ImageStore
    chat: ChatService  # answers questions with the loaded model; used from the engine thread only
    models: ModelManager


def build_services() -> Services:
    """From the saved settings (whose data folder, when set, decides where the store and the images live)."""
    settings = Settings.load()
    apply_data_dir(settings)
    store = ConversationStore()
    images = ImageStore()
    chat = ChatService(store, images, settings)
    return Services(settings=settings, store=store, images=images, chat=chat, models=ModelManager())
