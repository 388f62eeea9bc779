// hbn._hbn: the Python extension behind hbn/__init__.py. It views NumPy
// arrays, PyTorch CPU tensors and other DLPack exporters as hbn::Tensor
// without copying, allocates the outputs as arrays of
// input_x's kind, and raises hbn::Error as Python's TypeError, ValueError
// and RuntimeError. The signatures users call are hbn/__init__.py's.
#include <hbn/batch_norm.h>

#include <dlpack/dlpack.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <cstdint>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

[[noreturn]] void fail(hbn::ErrorKind kind, const std::string &message) {
    throw hbn::Error(kind, message);
}

std::string type_name(py::handle object) {
    return py::str(py::type::of(object).attr("__name__"));
}

// The TypeError of an array whose dtype hbn does not take.
[[noreturn]] void fail_dtype(const char *name, const std::string &dtype) {
    fail(hbn::ErrorKind::TypeError,
         std::string(name) + " must be float16, float32 or (a PyTorch tensor) bfloat16, got " + dtype);
}

struct Torch;

// An argument seen as an hbn::Tensor. `source` keeps its memory alive during
// the call, with `capsule` for a DLPack exporter (the capsule's destructor,
// the exporter's, releases the tensor afterwards). `torch`: set for a PyTorch
// tensor, whose call returns PyTorch tensors (else NumPy arrays).
struct View {
    hbn::Tensor tensor;
    py::object source;
    const Torch *torch = nullptr;
    py::object capsule;
};

// Strides in elements; hbn reads dense, row-major memory only. Extents of 1
// may carry any stride (NumPy and PyTorch both give such axes arbitrary
// strides).
bool is_row_major(const std::vector<int64_t> &shape, const std::vector<int64_t> &strides) {
    if (std::find(shape.begin(), shape.end(), 0) != shape.end()) {
        return true;  // no elements (PyTorch gives empty tensors arbitrary strides)
    }
    int64_t expected = 1;
    for (size_t i = shape.size(); i-- > 0;) {
        if (shape[i] != 1 && strides[i] != expected) {
            return false;
        }
        expected *= shape[i];
    }
    return true;
}

void check_row_major(const char *name, const std::vector<int64_t> &shape,
                     const std::vector<int64_t> &strides) {
    if (!is_row_major(shape, strides)) {
        fail(hbn::ErrorKind::ValueError,
             std::string(name) +
                 " is not contiguous: hbn reads dense row-major memory. Pass "
                 "numpy.ascontiguousarray(a) or tensor.contiguous() (a channels_last tensor "
                 "as tensor.permute(0, 2, 3, 1) with data_format='NHWC').");
    }
}

const char device_memory_message[] =
    "): hbn's Python binding reads host memory; pass CPU arrays, with device='cuda' or 'opencl' "
    "to run there";

View view_of_dlpack(const char *name, py::object source) {
    View view;
    view.source = source;
    view.capsule = source.attr("__dlpack__")();
    auto *managed =
        static_cast<DLManagedTensor *>(PyCapsule_GetPointer(view.capsule.ptr(), "dltensor"));
    if (!managed) {
        throw py::error_already_set();
    }
    const DLTensor &t = managed->dl_tensor;
    if (t.device.device_type != kDLCPU) {
        fail(hbn::ErrorKind::ValueError, std::string(name) + " is in device memory (DLPack device type " +
                                             std::to_string(t.device.device_type) + device_memory_message);
    }
    const bool is_float = t.dtype.code == kDLFloat && t.dtype.lanes == 1;
    if (!is_float || (t.dtype.bits != 16 && t.dtype.bits != 32)) {
        const char *code_names[] = {"int", "uint", "float", "opaque handle", "bfloat", "complex"};
        const std::string code =
            t.dtype.code < 6 ? code_names[t.dtype.code] : "type code " + std::to_string(t.dtype.code);
        const std::string lanes = t.dtype.lanes > 1 ? "x" + std::to_string(t.dtype.lanes) : "";
        fail_dtype(name, code + std::to_string(t.dtype.bits) + lanes);
    }
    view.tensor.dtype = t.dtype.bits == 16 ? hbn::DType::Float16 : hbn::DType::Float32;
    view.tensor.shape.assign(t.shape, t.shape + t.ndim);
    if (t.strides) {
        check_row_major(name, view.tensor.shape, {t.strides, t.strides + t.ndim});
    }
    view.tensor.data = static_cast<char *>(t.data) + t.byte_offset;
    return view;
}

// PyTorch's types, looked up once PyTorch is imported (before that, no
// argument can be a PyTorch tensor), and kept for the process's life: a
// static py::object would be destroyed after the interpreter.
struct Torch {
    py::object tensor, empty;
    // torch.float16, float32 and bfloat16, indexed by hbn::DType.
    std::array<py::object, 3> dtypes;

    const py::object &dtype_of(hbn::DType dtype) const {
        return dtypes[static_cast<size_t>(dtype)];
    }
};

const Torch *imported_torch() {
    static const Torch *torch = nullptr;
    if (!torch) {
        if (PyObject *module = PyDict_GetItemString(PyImport_GetModuleDict(), "torch")) {
            const py::handle m(module);
            torch = new Torch{m.attr("Tensor"),
                              m.attr("empty"),
                              {m.attr("float16"), m.attr("float32"), m.attr("bfloat16")}};
        }
    }
    return torch;
}

const py::dtype &numpy_dtype(hbn::DType dtype) {
    static const auto *float16 = new py::dtype("float16");
    static const auto *float32 = new py::dtype(py::dtype::of<float>());
    return dtype == hbn::DType::Float16 ? *float16 : *float32;
}

// A PyTorch tensor read through its own attributes, which cost about a third
// of exporting its DLPack capsule (a 2x2 call from Python took 9.5 us so, 12.7
// us through DLPack). Nothing here records an autograd graph, so a tensor that
// requires grad is read as it is.
View view_of_torch(const char *name, py::object source, const Torch &torch) {
    if (!source.attr("is_cpu").cast<bool>()) {
        fail(hbn::ErrorKind::ValueError, std::string(name) + " is in device memory (" +
                                             std::string(py::str(source.attr("device"))) +
                                             device_memory_message);
    }
    View view;
    const py::object dtype = source.attr("dtype");
    const auto known = std::find_if(torch.dtypes.begin(), torch.dtypes.end(),
                                    [&](const py::object &torch_dtype) { return dtype.is(torch_dtype); });
    if (known == torch.dtypes.end()) {
        fail_dtype(name, py::str(dtype));
    }
    view.tensor.dtype = static_cast<hbn::DType>(known - torch.dtypes.begin());
    view.tensor.shape = source.attr("shape").cast<std::vector<int64_t>>();
    check_row_major(name, view.tensor.shape, source.attr("stride")().cast<std::vector<int64_t>>());
    view.tensor.data = reinterpret_cast<void *>(source.attr("data_ptr")().cast<uintptr_t>());
    view.source = std::move(source);
    view.torch = &torch;
    return view;
}

// A NumPy array, read through NumPy's C API (pybind11's py::array).
View view_of_numpy(const char *name, py::array array, bool written) {
    const py::dtype dtype = array.dtype();
    if (dtype.kind() != 'f' || (dtype.itemsize() != 2 && dtype.itemsize() != 4)) {
        fail_dtype(name, py::str(py::handle(dtype)));
    }
    if (written && !array.writeable()) {
        fail(hbn::ErrorKind::ValueError, std::string(name) + " is read-only, but this call writes it");
    }
    View view;
    view.tensor.dtype = dtype.itemsize() == 2 ? hbn::DType::Float16 : hbn::DType::Float32;
    view.tensor.shape.assign(array.shape(), array.shape() + array.ndim());
    std::vector<int64_t> strides;
    for (py::ssize_t axis = 0; axis < array.ndim(); axis++) {
        if (array.strides(axis) % dtype.itemsize() != 0) {
            fail(hbn::ErrorKind::ValueError, std::string(name) + " has strides that are not whole elements");
        }
        strides.push_back(array.strides(axis) / dtype.itemsize());
    }
    check_row_major(name, view.tensor.shape, strides);
    view.tensor.data = const_cast<void *>(array.data());
    view.source = std::move(array);
    return view;
}

// `written`: the call writes this argument (a read-only NumPy array is then a
// ValueError; DLPack 0.6 cannot say that a tensor is read-only).
View view_of(const char *name, py::object source, bool written = false) {
    if (py::isinstance<py::array>(source)) {
        return view_of_numpy(name, py::reinterpret_steal<py::array>(source.release()), written);
    }
    if (const Torch *torch = imported_torch(); torch && py::isinstance(source, torch->tensor)) {
        return view_of_torch(name, std::move(source), *torch);
    }
    if (py::hasattr(source, "__dlpack__")) {
        return view_of_dlpack(name, std::move(source));
    }
    fail(hbn::ErrorKind::TypeError, std::string(name) +
                                        " must be a NumPy array or a tensor exporting DLPack (e.g. a "
                                        "PyTorch CPU tensor), got " + type_name(source));
}

// An optional argument: None is hbn's default Tensor{} (absent).
View view_of_optional(const char *name, const py::object &source) {
    return source.is_none() ? View{} : view_of(name, source);
}

// A new dense array of `like`'s kind: a PyTorch tensor for a PyTorch tensor,
// else a NumPy array. Made here, it needs no checks: only its data pointer is
// read.
View new_like(const View &like, const std::vector<int64_t> &shape, hbn::DType dtype) {
    View view;
    view.tensor.dtype = dtype;
    view.tensor.shape = shape;
    view.torch = like.torch;
    if (like.torch) {
        view.source = like.torch->empty(py::cast(shape), py::arg("dtype") = like.torch->dtype_of(dtype));
        view.tensor.data = reinterpret_cast<void *>(view.source.attr("data_ptr")().cast<uintptr_t>());
    } else {
        py::array array(numpy_dtype(dtype), shape);
        view.tensor.data = array.mutable_data();
        view.source = std::move(array);
    }
    return view;
}

std::vector<int64_t> per_channel_shape(const View &x, hbn::Layout layout) {
    const auto &shape = x.tensor.shape;
    if (shape.size() < 2) {
        return {0};  // hbn's validation reports the rank
    }
    return {layout == hbn::Layout::NCHW ? shape[1] : shape.back()};
}

// Python's bool or NumPy's bool_ (whose type is only known by name here).
bool is_bool(const py::object &value) {
    return PyBool_Check(value.ptr()) || type_name(value) == "bool_";
}

bool bool_argument(const char *name, const py::object &value) {
    // Python's bool and NumPy's bool_, as MindSpore's check_bool takes.
    if (!is_bool(value)) {
        fail(hbn::ErrorKind::TypeError, std::string(name) + " must be a bool, got " + type_name(value));
    }
    return value.cast<bool>();
}

// A real number: Python's int and float, NumPy's scalars, a 0-d tensor
// (whatever converts with __float__ or __index__), but not a bool.
double real_argument(const char *name, const py::object &value) {
    if (PyFloat_Check(value.ptr()) || (PyLong_Check(value.ptr()) && !PyBool_Check(value.ptr()))) {
        return value.cast<double>();  // the usual case, without looking up a type name
    }
    const PyNumberMethods *number = Py_TYPE(value.ptr())->tp_as_number;
    if (is_bool(value) || !number || !(number->nb_float || number->nb_index)) {
        fail(hbn::ErrorKind::TypeError, std::string(name) + " must be a float, got " + type_name(value));
    }
    return value.cast<double>();
}

std::string string_argument(const char *name, const py::object &value) {
    if (!PyUnicode_Check(value.ptr())) {
        fail(hbn::ErrorKind::TypeError, std::string(name) + " must be a str, got " + type_name(value));
    }
    return value.cast<std::string>();
}

// The Python name of a device: hbn::device_name in lower case.
std::string device_key(hbn::Device device) {
    std::string name = hbn::device_name(device);
    for (char &c : name) {
        c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    }
    return name;
}

hbn::Device device_argument(const py::object &value) {
    const std::string name = string_argument("device", value);
    for (hbn::Device device : {hbn::Device::Auto, hbn::Device::CPU, hbn::Device::OpenCL, hbn::Device::CUDA}) {
        if (name == device_key(device)) {
            return device;
        }
    }
    fail(hbn::ErrorKind::ValueError, "device must be 'auto', 'cpu', 'opencl' or 'cuda', got '" + name + "'");
}

// A Python all-reduce as hbn's: the hook gets a float64 NumPy array over
// hbn's values, valid during the call only, and sums it across processes in
// place. hbn calls it without the GIL (the kernels run without it), so it
// takes the GIL here, and holds the hook by a handle, which copying the
// std::function does not count references of: the caller's argument keeps
// it alive.
hbn::AllReduce all_reduce_of(const py::object &hook) {
    if (hook.is_none()) {
        return {};
    }
    if (!PyCallable_Check(hook.ptr())) {
        fail(hbn::ErrorKind::TypeError, "all_reduce must be callable, got " + type_name(hook));
    }
    return [callable = py::handle(hook)](double *values, std::size_t count) {
        py::gil_scoped_acquire locked;
        const py::capsule unowned(values, [](void *) {});
        callable(py::array_t<double>(static_cast<py::ssize_t>(count), values, unowned));
    };
}

// The fused epilogue's activation: None, or "relu" (as torch.nn.functional names it).
hbn::Activation activation_argument(const py::object &value) {
    if (value.is_none()) {
        return hbn::Activation::None;
    }
    if (!PyUnicode_Check(value.ptr())) {
        fail(hbn::ErrorKind::TypeError, "activation must be None or a str, got " + type_name(value));
    }
    const std::string name = value.cast<std::string>();
    if (name != "relu") {
        fail(hbn::ErrorKind::ValueError, "activation must be None or 'relu', got '" + name + "'");
    }
    return hbn::Activation::ReLU;
}

hbn::BatchNormOptions options_of(const py::object &training, const py::object &momentum,
                                 const py::object &eps, const py::object &data_format,
                                 const py::object &device, const py::object &all_reduce,
                                 const py::object &activation) {
    hbn::BatchNormOptions options;
    options.all_reduce = all_reduce_of(all_reduce);
    options.training = bool_argument("training", training);
    options.momentum = real_argument("momentum", momentum);
    options.eps = real_argument("eps", eps);
    const std::string format = string_argument("data_format", data_format);
    if (format == "NCHW") {
        options.layout = hbn::Layout::NCHW;
    } else if (format == "NHWC") {
        options.layout = hbn::Layout::NHWC;
    } else {
        fail(hbn::ErrorKind::ValueError, "data_format must be 'NCHW' or 'NHWC', got '" + format + "'");
    }
    options.device = device_argument(device);
    options.activation = activation_argument(activation);
    return options;
}

py::object batch_norm(py::object input_x, py::object running_mean, py::object running_var,
                      py::object weight, py::object bias, py::object training, py::object momentum,
                      py::object eps, py::object data_format, py::object device, py::object all_reduce,
                      py::object activation, py::object residual) {
    hbn::BatchNormOptions options =
        options_of(training, momentum, eps, data_format, device, all_reduce, activation);
    const View x = view_of("input_x", input_x);
    const View mean = view_of("running_mean", running_mean, options.training);
    const View var = view_of("running_var", running_var, options.training);
    const View scale = view_of("weight", weight);
    const View shift = view_of("bias", bias);
    const View added = view_of_optional("residual", residual);
    options.residual = added.tensor;
    const View output = new_like(x, x.tensor.shape, x.tensor.dtype);
    {
        py::gil_scoped_release unlocked;
        hbn::batch_norm(x.tensor, mean.tensor, var.tensor, scale.tensor, shift.tensor, output.tensor,
                        options);
    }
    return output.source;
}

py::tuple batch_norm_training(py::object input_x, py::object running_mean, py::object running_var,
                              py::object weight, py::object bias, py::object momentum, py::object eps,
                              py::object data_format, py::object device, py::object all_reduce,
                              py::object activation, py::object residual) {
    hbn::BatchNormOptions options =
        options_of(py::bool_(true), momentum, eps, data_format, device, all_reduce, activation);
    const View x = view_of("input_x", input_x);
    const View mean = view_of("running_mean", running_mean, true);
    const View var = view_of("running_var", running_var, true);
    const View scale = view_of("weight", weight);
    const View shift = view_of("bias", bias);
    const View added = view_of_optional("residual", residual);
    options.residual = added.tensor;
    const View output = new_like(x, x.tensor.shape, x.tensor.dtype);
    const auto channels = per_channel_shape(x, options.layout);
    const View saved_mean = new_like(x, channels, hbn::DType::Float32);
    const View saved_inv_std = new_like(x, channels, hbn::DType::Float32);
    {
        py::gil_scoped_release unlocked;
        hbn::batch_norm_training(x.tensor, mean.tensor, var.tensor, scale.tensor, shift.tensor,
                                 output.tensor, saved_mean.tensor, saved_inv_std.tensor, options);
    }
    return py::make_tuple(output.source, saved_mean.source, saved_inv_std.source);
}

py::tuple batch_norm_backward(py::object grad_output, py::object input_x, py::object weight,
                              py::object running_mean, py::object running_var, py::object saved_mean,
                              py::object saved_inv_std, py::object training, py::object eps,
                              py::object data_format, py::object device, py::object all_reduce,
                              py::object activation, py::object forward_output,
                              py::object return_grad_residual) {
    hbn::BatchNormOptions options =
        options_of(training, py::float_(0.1), eps, data_format, device, all_reduce, activation);
    const bool wants_grad_residual = bool_argument("return_grad_residual", return_grad_residual);
    const View dy = view_of("grad_output", grad_output);
    const View x = view_of("input_x", input_x);
    const View scale = view_of("weight", weight);
    const View mean = view_of_optional("running_mean", running_mean);
    const View var = view_of_optional("running_var", running_var);
    const View batch_mean = view_of_optional("saved_mean", saved_mean);
    const View inv_std = view_of_optional("saved_inv_std", saved_inv_std);
    const View mask = view_of_optional("forward_output", forward_output);
    options.forward_output = mask.tensor;
    const View grad_input = new_like(x, x.tensor.shape, x.tensor.dtype);
    const auto channels = per_channel_shape(x, options.layout);
    const View grad_weight = new_like(scale, channels, scale.tensor.dtype);
    const View grad_bias = new_like(scale, channels, scale.tensor.dtype);
    const View grad_residual = wants_grad_residual ? new_like(x, x.tensor.shape, x.tensor.dtype) : View{};
    options.grad_residual = grad_residual.tensor;
    {
        py::gil_scoped_release unlocked;
        hbn::batch_norm_backward(dy.tensor, x.tensor, scale.tensor, mean.tensor, var.tensor,
                                 batch_mean.tensor, inv_std.tensor, grad_input.tensor,
                                 grad_weight.tensor, grad_bias.tensor, options);
    }
    if (wants_grad_residual) {
        return py::make_tuple(grad_input.source, grad_weight.source, grad_bias.source,
                              grad_residual.source);
    }
    return py::make_tuple(grad_input.source, grad_weight.source, grad_bias.source);
}

}  // namespace

PYBIND11_MODULE(_hbn, m) {
    m.doc() = "hbn's extension; use the hbn package.";
    m.attr("__version__") = HBN_VERSION;

    py::register_exception_translator([](std::exception_ptr raised) {
        try {
            if (raised) {
                std::rethrow_exception(raised);
            }
        } catch (const hbn::Error &error) {
            PyObject *type = error.kind() == hbn::ErrorKind::TypeError    ? PyExc_TypeError
                             : error.kind() == hbn::ErrorKind::ValueError ? PyExc_ValueError
                                                                          : PyExc_RuntimeError;
            PyErr_SetString(type, error.what());
        }
    });

    m.def("batch_norm", &batch_norm);
    m.def("batch_norm_training", &batch_norm_training);
    m.def("batch_norm_backward", &batch_norm_backward);
    m.def("backend_status", [](const py::object &device) {
        const hbn::BackendStatus status = hbn::backend_status(device_argument(device));
        return py::make_tuple(status.built, status.usable, status.detail);
    });
    m.def("auto_device", [] { return device_key(hbn::auto_device()); });
}
