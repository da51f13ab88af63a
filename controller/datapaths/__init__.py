"""Datapaths: each turns a model State into kernel forwarding state.

All of them implement :class:`controller.datapaths.base.Datapath`.
"""
