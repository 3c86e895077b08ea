'''Tests for which tensors of a traced forward share memory (zennit_bnfuse.aliasing).'''
import pytest
import torch
import torch.fx

from fusion_cases import Lambda
from zennit_bnfuse.aliasing import (
    inputs_written_after, keep_write_in_result, memory_group, modules_of, read_after, written_after,
)
from zennit_bnfuse.graph import LRPTracer


def traced(forward):
    '''The graph of ``Lambda(forward)`` and the ``module_of`` for it.'''
    model = Lambda(lambda module, x: forward(x))
    return LRPTracer().trace(model), modules_of(model)


def node(graph, name):
    return next(node for node in graph.nodes if node.name == name)


@pytest.mark.parametrize('forward, expected', [
    (lambda x: (x * 1).add_(1), False),  # written into a new tensor nobody else reads
    (lambda x: [y := x * 1, z := y.add_(1), z.relu()][2], False),  # read after the write through its own result
    (lambda x: [y := x * 1, y.add_(1), y.relu()][2], True),  # read after the write through the tensor written into
    (lambda x: [y := x * 1, v := y.view(-1), y.add_(1), v][3], True),  # a view taken before it is read after
    (lambda x: [y := x * 1, y[0].add_(1), y][2], True),  # the tensor whose view it writes into is read after
    (lambda x: [y := x * 1, a := y.chunk(2)[0], y.add_(1), a][3], True),  # through a split
    (lambda x: [y := x * 1, z := y.exp(), y.add_(1), z][3], False),  # read after, but only by a new tensor
    (lambda x: [y := x * 1, y.T.add_(1), y][2], True),  # ``.T`` is a view
    (lambda x: x.add_(1), True),  # the forward's input: the caller sees the write
    # views no list named: the schema says so (ravel, as_strided, hsplit), or the op may return its input
    (lambda x: [y := x * 1, v := y.ravel(), y.add_(1), v][3], True),
    (lambda x: [y := x * 1, v := torch.as_strided(y, y.shape, y.stride()), y.add_(1), v][3], True),
    (lambda x: [y := x * 1, v := torch.hsplit(y, 2)[0], y.add_(1), v][3], True),
    (lambda x: [y := x * 1, v := torch.atleast_2d(y), y.add_(1), v][3], True),
    (lambda x: [y := x * 1, v := torch.nn.functional.alpha_dropout(y), y.add_(1), v][3], True),
    # a view taken before whose shape, dtype or device only is read after: no write changes those
    (lambda x: [y := x * 1, v := y.view(-1), y.add_(1), x.new_ones(v.size(0), v.dim()).to(v.dtype)][3], False),
    (lambda x: [y := x * 1, v := y.view(-1), y.add_(1), x.new_ones(v.shape).to(v.device)][3], False),
])
def test_read_after(forward, expected):
    graph, module_of = traced(forward)
    writer = next(node for node in graph.nodes if node.target == 'add_')
    assert read_after(writer, module_of) is expected


@pytest.mark.parametrize('forward, writer', [
    (lambda x: [y := x * 1, z := y.exp(), torch.add(y, 1, out=y), z][3], 'add'),
    (lambda x: [y := x * 1, z := y.exp(), y.__setitem__(0, 0.), z][3], 'setitem'),
    (lambda x: [y := x * 1, z := y.exp(), y.ravel().mul_(2.), z][3], 'mul_'),
])
def test_written_after_sees_out_arguments_setitem_and_views_the_schemas_name(forward, writer):
    graph, module_of = traced(forward)
    exp = node(graph, 'exp')
    assert written_after(exp, exp.args[0], module_of).name == writer


def test_later_reads_by_name_are_given_the_result_of_the_write():
    graph, module_of = traced(lambda x: [y := x * 1, y.relu_(), y.exp()][2])
    relu = node(graph, 'relu_')
    assert read_after(relu, module_of) and keep_write_in_result(relu, module_of)
    assert node(graph, 'exp').args == (relu,) and not read_after(relu, module_of)
    graph, module_of = traced(lambda x: [y := x * 1, v := y.view(-1), y.relu_(), v.exp()][3])
    assert not keep_write_in_result(node(graph, 'relu_'), module_of)  # a view taken before it is read after


def test_memory_group_follows_views_both_ways():
    graph, module_of = traced(lambda x: [y := x * 1, v := y.view(-1), v[:2].add_(1), y.exp()][3])
    names = {node.name for node in memory_group(node(graph, 'getitem'), module_of)}
    assert names == {'mul', 'view', 'getitem', 'add_'}


class Written(torch.nn.Module):
    '''``first`` reads a tensor an in-place ReLU and ``+=`` write into later; ``second`` reads it after both.'''
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self.relu = torch.nn.ReLU(inplace=True)

    def forward(self, x):
        hidden = x * 2
        out = self.first(hidden)
        hidden = self.relu(hidden)
        hidden += 1
        return out + self.second(hidden)


def test_written_after_names_the_first_writer():
    model = Written()
    graph = LRPTracer().trace(model)
    first, second = node(graph, 'first'), node(graph, 'second')
    assert written_after(first, first.args[0], modules_of(model)).name == 'relu'
    assert written_after(second, second.args[0], modules_of(model)) is None
    assert inputs_written_after(graph, modules_of(model)) == {'first', 'relu'}  # relu's by `+=`


def test_items_of_broadcast_tensors_share_memory_with_their_own_argument_only():
    graph, module_of = traced(lambda x: [a := x * 1, b := x * 2, pair := torch.broadcast_tensors(a, b),
                                         pair[0] + pair[1]][3])
    names = {node.name for node in memory_group(node(graph, 'mul'), module_of)}
    assert 'mul_1' not in names and 'getitem' in names and 'getitem_1' not in names
